"""``python -m lgdlm_ds.bench`` runs lgdlm_ds.tools.bench."""
import sys

from .tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
