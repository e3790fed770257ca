"""The HTTP gateway's parts, one concept each; ``router.api`` assembles them.

``errors`` maps our exceptions to OpenAI-shaped error responses, ``deps``
gives a route the herder's service, the async Redis client and the Bearer
API key, ``waiting`` follows an admitted job to its end, and
``completions``, ``jobs`` and ``ops`` are the routers.
"""
