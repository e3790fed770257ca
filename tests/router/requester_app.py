"""A requester's own Celery app, as the agent would run it: it receives
Inference-Responses on its queue and records them in a Redis list."""

import json
import os

import redis
from celery import Celery

app = Celery("requester", broker=os.environ["LLAMAS_REDIS_URL"], backend=os.environ["LLAMAS_REDIS_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")

RECEIVED_KEY = "test:requester:received"


@app.task(name="requester.inference_response")
def inference_response(response: dict) -> None:
    redis.Redis.from_url(os.environ["LLAMAS_REDIS_URL"]).rpush(RECEIVED_KEY, json.dumps(response))
