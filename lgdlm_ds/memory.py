"""``python -m lgdlm_ds.memory`` runs lgdlm_ds.tools.memory."""
import sys

from .tools.memory import main

if __name__ == "__main__":
    sys.exit(main())
