"""The HTTP API's routes, one router per resource (datasets, jobs, models, prediction, info).

Each module's `*_router(service)` builds its router over the server's `Service` (store, job runner, predictor
pool, limits); `app.create_app` includes them and owns what is shared: error answers, the token and disk guards,
the JSON body gate and HEAD.
"""
