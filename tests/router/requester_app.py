"""A requester's own Celery app, as the agent would run it: it receives
Inference-Responses on its queue and records them in a Redis list.

Delivery is at least once (``router.core.forwarding``): like the agent, it
acts on a job's response once, by its job id, and counts the repeats it dropped.
"""

import json
import os

import redis
from celery import Celery

app = Celery("requester", broker=os.environ["LLAMAS_REDIS_URL"], backend=os.environ["LLAMAS_REDIS_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")

RECEIVED_KEY = "test:requester:received"
#: Responses received again for a job already acted on, dropped (a list of job ids).
DROPPED_KEY = "test:requester:dropped"
SEEN_PREFIX = "test:requester:seen:"


@app.task(name="requester.inference_response")
def inference_response(response: dict) -> None:
    r = redis.Redis.from_url(os.environ["LLAMAS_REDIS_URL"])
    if not r.set(SEEN_PREFIX + response["job_id"], 1, nx=True, ex=86400):
        r.rpush(DROPPED_KEY, response["job_id"])
        return
    r.rpush(RECEIVED_KEY, json.dumps(response))
