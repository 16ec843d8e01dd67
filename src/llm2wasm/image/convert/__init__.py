"""The conversion command that ships in the image (standard library only at import time)."""
