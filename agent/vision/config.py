"""The image check's config: ``[vision]`` (documented in config/sortgate.example.toml)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["VisionConfig", "VisionThresholds"]

Ms = Annotated[int, Field(ge=1, le=600_000)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class VisionThresholds(_Strict):
    """A parcel is flagged when a target class's score reaches its threshold."""

    battery: float = Field(0.5, gt=0, le=1)
    blade: float = Field(0.5, gt=0, le=1)
    firearm: float = Field(0.5, gt=0, le=1)
    liquid: float = Field(0.5, gt=0, le=1)


class VisionConfig(_Strict):
    mode: Literal["off", "advisory", "required"] = Field(
        "off", description="required: no release without a passed image check; advisory: recorded only"
    )
    model: str = Field(
        "xray_int8.tflite", min_length=1,
        description="a bare file name names a model shipped with sortgate; a path with a folder, a file of your own",
    )
    source: Literal["folder", "capture"] = "folder"
    folder: str | None = Field(None, description="source = folder: where the scanner writes each parcel's image")
    pattern: str = Field("*.png", min_length=1, description="files to take; write to another name, then rename")
    name_seq_regex: str | None = Field(
        None,
        description="A regex whose group 'seq' finds the controller's trigger sequence in the file name; "
        "images are then matched exactly. Unset: matched by order within window_ms",
    )
    consume: bool = Field(True, description="delete an image once checked (flagged ones are kept, see keep_dir)")
    capture_url: str | None = Field(None, description="source = capture: an OpenCV VideoCapture device, file or stream")
    capture_delay_ms: int = Field(50, ge=0, le=2000, description="source = capture: grab this long after the trigger")
    window_ms: Ms = Field(400, le=5000, description="an image must arrive this long after its trigger")
    poll_ms: int = Field(5, ge=1, le=1000)
    thresholds: VisionThresholds = VisionThresholds()
    keep_dir: str = Field("/var/lib/sortgate/flagged", description="flagged images kept for officers' review")
    keep_max_mb: int = Field(500, ge=1, le=1_000_000, description="oldest kept images are removed beyond this")

    @model_validator(mode="after")
    def _source(self) -> VisionConfig:
        if self.name_seq_regex is not None:
            try:
                if "seq" not in re.compile(self.name_seq_regex).groupindex:
                    raise ValueError("name_seq_regex needs a group named 'seq', e.g. 'seq(?P<seq>\\d+)'")
            except re.error as exc:
                raise ValueError(f"name_seq_regex is not a valid regex: {exc}") from exc
        if self.mode != "off" and self.source == "folder" and not self.folder:
            raise ValueError("source = 'folder' needs folder")
        if self.mode != "off" and self.source == "capture" and not self.capture_url:
            raise ValueError("source = 'capture' needs capture_url")
        return self
