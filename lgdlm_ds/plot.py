"""``python -m lgdlm_ds.plot`` runs lgdlm_ds.tools.plot."""
import sys

from .tools.plot import main

if __name__ == "__main__":
    sys.exit(main())
