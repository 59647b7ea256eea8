"""The small real rasters of tests/data (see tests/data/README.md) and a check of one-line error messages,
shared by the tiling, footprint and output tests."""
from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
SHARED_GEOTIFF = Path(__file__).resolve().parents[2] / "shared" / "data" / "geotiff"
S2 = DATA / "s2_crop512.tif"  # Sentinel-2 true colour, 10 m, EPSG:32618, uint8
RGB_BYTE = DATA / "rgb_byte_nodata.tif"  # Landsat 7, 300 m, nodata=0 collar
WORLD = DATA / "world_rgb_4326.tif"  # EPSG:4326, 512 x 256
USGS = DATA / "usgs_3857.tif"  # USGS orthophoto, EPSG:3857, 0.1524 m on the ground
PNG = DATA / "s2_plain.png"  # the Sentinel-2 crop without georeferencing


def assert_one_line(exc: Exception, *needles: str) -> None:
    """The message is one line, without traceback text, and names every needle."""
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
