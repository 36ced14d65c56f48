"""One APIRouter per area: search, catalog (similar + images), admin (reload), health
(healthz, readyz, metrics) and the page."""
