import pytest

from llama_tasks.placement import place
from llama_tasks.settings import WorkerSettings


def test_each_child_takes_one_gpu_by_index_and_offloads_everything():
    gpus = [0, 1, 2, 3]
    placements = [place(i, gpus, concurrency=4, cpus=16) for i in range(4)]
    assert [p.gpu for p in placements] == [0, 1, 2, 3]
    assert [p.cuda_visible_devices for p in placements] == ["0", "1", "2", "3"]
    assert all(p.n_gpu_layers == -1 for p in placements)


def test_gpu_ids_need_not_be_contiguous_and_extra_children_share_round_robin():
    assert [place(i, [2, 5], 4, 8).gpu for i in range(4)] == [2, 5, 2, 5]


def test_without_gpus_children_split_the_cores():
    p = place(1, [], concurrency=2, cpus=8)
    assert (p.gpu, p.n_gpu_layers, p.n_threads, p.cuda_visible_devices) == (None, 0, 4, None)
    assert place(0, [], concurrency=4, cpus=2).n_threads == 1  # never zero threads


def test_negative_child_index_is_refused():
    with pytest.raises(ValueError):
        place(-1, [0], 1, 1)


def test_gpus_setting_parses_and_slots_default_to_eight():
    s = WorkerSettings(gpus="0, 1,3")
    assert s.gpu_ids == [0, 1, 3]
    assert WorkerSettings().slots == 8 and WorkerSettings(slots=3).slots == 3
    with pytest.raises(ValueError, match="LLAMAS_GPUS"):
        WorkerSettings(gpus="0,x")
    with pytest.raises(ValueError):
        WorkerSettings(slots=0)


def test_up_starts_one_worker_per_gpu_or_one_for_the_cpu():
    from router.up import worker_layout

    assert worker_layout("smollm2", "host", []) == [("llama-smollm2@host", {"LLAMAS_MODEL": "smollm2", "LLAMAS_GPUS": ""})]
    assert worker_layout("m", "h", [0, 2]) == [
        ("llama-m-gpu0@h", {"LLAMAS_MODEL": "m", "LLAMAS_GPUS": "0"}),
        ("llama-m-gpu2@h", {"LLAMAS_MODEL": "m", "LLAMAS_GPUS": "2"}),
    ]
