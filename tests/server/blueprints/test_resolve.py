from slmops.protocol.bundle import VariantDescriptor
from slmops.protocol.device import Inventory
from slmops.server.resolve import ram_needed, resolve_variant

MB = 2**20


def _v(
    name: str, fmt: str, disk: int, ram: int | None, kld: float, selected: list[str] | None = None
) -> VariantDescriptor:
    return VariantDescriptor(
        name=name,
        runtime="llama.cpp" if fmt == "gguf" else "onnxruntime-genai",
        format=fmt,
        disk_bytes=disk * MB,
        ram_bytes=ram * MB if ram else None,
        kld_mean=kld,
        selected_for=selected or [],
    )


VARIANTS = [
    _v("f16", "gguf", 2000, 2600, 0.0001, ["x86-minipc-16gb"]),
    _v("q8", "gguf", 1100, 1500, 0.002, ["rpi5-8gb"]),
    _v("q4", "gguf", 650, 900, 0.03, ["arm-gateway-2gb"]),
    _v("onnx-int4", "onnx-genai", 700, 950, 0.02),
]


def _inv(
    ram_mb: int, runtimes: list[str], profile: str | None = None, disk_mb: int = 10_000
) -> Inventory:
    return Inventory(
        arch="arm64",
        cores=4,
        ram_bytes=8 << 30,
        free_disk_bytes=disk_mb * MB,
        runtimes=runtimes,  # type: ignore[arg-type]
        agent_version="0.1.0",
        model_ram_bytes=ram_mb * MB,
        model_cores=2,
        profile=profile,
    )


def test_profile_pick_when_it_fits() -> None:
    r = resolve_variant(_inv(4096, ["gguf"], "rpi5-8gb"), VARIANTS)
    assert r.variant == "q8" and "selected by the evaluation" in r.reason


def test_profile_pick_too_big_falls_back_to_best_fitting() -> None:
    r = resolve_variant(_inv(1000, ["gguf", "onnx-genai"], "x86-minipc-16gb"), VARIANTS)
    assert r.variant == "onnx-int4" and "does not fit" in r.reason


def test_runtime_and_disk_limits() -> None:
    assert resolve_variant(_inv(4096, ["onnx-genai"]), VARIANTS).variant == "onnx-int4"
    assert resolve_variant(_inv(4096, ["gguf"], disk_mb=800), VARIANTS).variant == "q4"


def test_unplaceable_names_the_reasons() -> None:
    r = resolve_variant(_inv(300, ["gguf"]), VARIANTS)
    assert (
        r.variant is None
        and "needs 900 MiB RAM" in r.reason
        and "onnx-genai not on the device" in r.reason
    )


def test_ram_estimate_without_measurement_has_headroom() -> None:
    d = _v("x", "gguf", 1000, None, 0.1)
    assert ram_needed(d) == 1250 * MB
