from fastapi import APIRouter, Depends

from service.api.deps import get_principal
from service.api.routes import backbones, datasets, jobs, keys, models, presets

# Every /v1 route needs a valid API key (unless ZOOFIT_AUTH_ENABLED=false).
api_router = APIRouter(prefix="/v1", dependencies=[Depends(get_principal)])
for _r in (datasets.router, jobs.router, models.router, backbones.router, presets.router, keys.router):
    api_router.include_router(_r)
