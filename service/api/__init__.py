from fastapi import APIRouter, Depends

from service.api.deps import get_principal
from service.api.routes import backbones, datasets, exports, jobs, keys, models, presets
from service.problems import problem_responses

# Every /v1 route needs a valid API key (unless ZOOFIT_AUTH_ENABLED=false).
# Errors any of them can answer: a NUL in the URL (400), no valid key (401), a body over the cap
# (413), input that does not validate (422), the database down (503); each route adds its own.
api_router = APIRouter(
    prefix="/v1", dependencies=[Depends(get_principal)], responses=problem_responses(400, 401, 413, 422, 503)
)
for _r in (datasets.router, jobs.router, models.router, exports.router, backbones.router, presets.router,
           keys.router):
    api_router.include_router(_r)
