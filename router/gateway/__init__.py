"""The HTTP gateway, one concept a module; ``app.create_app`` assembles them and ``router.api`` serves it.

``errors`` maps our exceptions to OpenAI-shaped error responses, ``deps``
gives a route the herder's service, the async Redis client and the Bearer
API key, ``waiting`` follows an admitted job to its end, ``openai_request``
and ``openai_shapes`` read and write OpenAI's shapes, ``prometheus`` serves
the metrics, ``snapshot`` builds what the dashboard shows, and
``completions``, ``jobs``, ``ops`` and ``dashboard`` are the routers.
``limits`` bounds what a request may make the gateway read (ASGI middleware
and the JSON parse), ``headers`` adds security headers to every response,
``streams`` caps each key's open event streams, and ``sessions`` keeps the
dashboard's sign-ins. ``http_protocol`` is what uvicorn serves it with
(``--http``): its h11 protocol with a deadline on request headers.
"""
