"""The `vhostlab` command (placeholder, filled in below)."""
import sys
def main(argv=None):
    return 0
if __name__ == "__main__":
    sys.exit(main())
