import pytest

from llama_tasks.placement import place
from llama_tasks.settings import WorkerSettings


def test_a_gpu_process_sees_only_its_gpu_and_offloads_everything():
    p = place(3, threads=16)
    assert (p.gpu, p.cuda_visible_devices, p.n_gpu_layers, p.n_threads) == (3, "3", -1, 16)


def test_a_cpu_process_uses_the_threads_it_is_given():
    p = place(None, threads=2)
    assert (p.gpu, p.n_gpu_layers, p.n_threads, p.cuda_visible_devices) == (None, 0, 2, None)


@pytest.mark.parametrize("gpu, threads", [(-1, 1), (0, 0)])
def test_a_negative_gpu_or_no_threads_is_refused(gpu, threads):
    with pytest.raises(ValueError):
        place(gpu, threads)


def test_gpus_setting_parses_and_slots_default_to_eight():
    s = WorkerSettings(gpus="0, 1,3")
    assert s.gpu_ids == [0, 1, 3]
    assert WorkerSettings().slots == 8 and WorkerSettings(slots=3).slots == 3
    with pytest.raises(ValueError, match="LLAMAS_GPUS"):
        WorkerSettings(gpus="0,x")
    with pytest.raises(ValueError):
        WorkerSettings(slots=0)


def test_up_starts_one_worker_per_gpu_or_one_for_the_cpu():
    from router.local.up import worker_layout

    assert worker_layout("smollm2", "host", []) == [("llama-smollm2@host", {"LLAMAS_MODEL": "smollm2", "LLAMAS_GPUS": ""})]
    assert worker_layout("m", "h", [0, 2]) == [
        ("llama-m-gpu0@h", {"LLAMAS_MODEL": "m", "LLAMAS_GPUS": "0"}),
        ("llama-m-gpu2@h", {"LLAMAS_MODEL": "m", "LLAMAS_GPUS": "2"}),
    ]


def test_up_with_workers_starts_that_many_with_no_model_round_robin_over_gpus_or_sharing_the_cores():
    from router.local.up import placed_layout

    assert placed_layout(2, "h", [0, 1], cores=16) == [("llama-0-gpu0@h", {"LLAMAS_GPUS": "0"}),
                                                         ("llama-1-gpu1@h", {"LLAMAS_GPUS": "1"})]
    assert [env["LLAMAS_GPUS"] for _, env in placed_layout(3, "h", [5], cores=16)] == ["5", "5", "5"]
    # On the CPU, llama.cpp's threads of two workers must not compete for one core.
    assert placed_layout(2, "h", [], cores=2) == [("llama-0@h", {"LLAMAS_GPUS": "", "LLAMAS_THREADS": "1"}),
                                                   ("llama-1@h", {"LLAMAS_GPUS": "", "LLAMAS_THREADS": "1"})]
    assert placed_layout(3, "h", [], cores=2)[0][1]["LLAMAS_THREADS"] == "1"
