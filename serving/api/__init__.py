"""The HTTP layer of serving (FastAPI): error answers, request parsing, pydantic schemas,
decode slots, Prometheus metrics and one APIRouter per area (serving.api.routes);
serving.app assembles them."""
