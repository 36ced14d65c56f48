"""`python -m catalog_search ...` is `catalog-search ...`."""
import sys

from catalog_search.cli import main

sys.exit(main())
