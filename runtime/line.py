"""The line configuration (``edgeinspect serve --config line.yaml``): the cameras of one box and where
their verdicts go. Validated on load; every error names its key. Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from edgeinspect.errors import ConfigError
from edgeinspect.schema import Section, integer, real, validation_errors

Id = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # part of a ZeroMQ topic and of a journal folder name


class CameraEntry(Section):
    """One camera: its source, the bundle judging it, and how."""

    id: str = Id
    source: str                              # video file, image folder, device index, RTSP/HTTP URL, GStreamer
    bundle: str                              # model bundle folder (cameras with the same bundle share one engine)
    engine: str = "auto"                     # FORMAT[:PRECISION] or auto
    fps: real(0.0, 1000.0, lo_open=True) | None = None  # frame-rate cap; None: as the source delivers
    roi: tuple[integer(0), integer(0), integer(1), integer(1)] | None = None  # x0, y0, x1, y1 judged (frame px)
    loop: bool = False                       # restart a video file or folder at its end
    max_frames: integer(0) | None = None     # stop this camera after this many frames
    frames: Literal["strict", "convert"] = "strict"  # frames unlike the training images: ERROR or converted
    reconnect_attempts: integer(0, 1000) = 5  # live source: reopen attempts after a failed read before it fails
    reconnect_delay_s: real(0.0, 60.0) = 1.0  # first wait before reopening, doubling up to 10 s

    @field_validator("roi")
    @classmethod
    def _roi_has_area(cls, roi: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if roi is not None and not (roi[2] > roi[0] and roi[3] > roi[1]):
            raise ValueError(f"roi {list(roi)} is empty: it is [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        return roi


class LineConfig(Section):
    """A line: its id, the publish endpoint, journal and metrics, and the cameras."""

    line: str = Id
    publish: str = "tcp://127.0.0.1:5555"
    control: str | None = None               # control socket endpoint (REP); null: none
    control_token: str | None = None         # required in every control request; needed off localhost
    journal: str | None = None               # folder; each camera journals in <journal>/<line>.<camera id>/
    journal_fsync: Literal["interval", "always", "never"] = "interval"
    metrics_port: integer(0, 65535) | None = None
    metrics_host: str = "127.0.0.1"
    providers: list[Literal["cpu", "cuda", "tensorrt", "coreml"]] = ["cpu"]
    triton_url: str | None = None            # Triton server (gRPC host:port) for cameras with engine: triton[:p]
    wait_subscribers: integer(0) = 0
    wait_timeout_s: real(0.0) = 10.0
    cameras: list[CameraEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> LineConfig:
        ids = [c.id for c in self.cameras]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"cameras: ids {repeated} are used more than once (each camera needs its own id)")
        return self


def line_config(data: object, where: str = "line config") -> LineConfig:
    """Validate ``data`` (parsed YAML); ConfigError naming every wrong key."""
    try:
        return LineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {'; '.join(validation_errors(exc, LineConfig))}") from None


def load_line_config(path: str | Path) -> LineConfig:
    """Read and validate a line.yaml; relative bundle, source and journal paths are relative to the file."""
    from edgeinspect.config import read_yaml

    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict):
        base = path.resolve().parent
        if isinstance(data.get("journal"), str):
            data["journal"] = str(base / data["journal"])
        for camera in data.get("cameras") or []:
            for key in ("bundle", "source"):
                if isinstance(camera, dict) and isinstance(camera.get(key), str) and (base / camera[key]).exists():
                    camera[key] = str(base / camera[key])
    return line_config(data, str(path))
