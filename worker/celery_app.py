"""`celery -A worker.celery_app worker`: the queue's app (service/queue.py) with the worker's task module.

Delivery semantics are described in service/queue.py; the task itself is in worker/tasks.py.
"""

from service.queue import make_celery
from service.settings import get_settings

celery_app = make_celery(get_settings(), include=["worker.tasks"])  # the environment's CONSA_* settings
