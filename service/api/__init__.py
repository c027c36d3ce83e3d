from fastapi import APIRouter

from service.api.routes import backbones, datasets, jobs, models

api_router = APIRouter(prefix="/v1")
for _r in (datasets.router, jobs.router, models.router, backbones.router):
    api_router.include_router(_r)
