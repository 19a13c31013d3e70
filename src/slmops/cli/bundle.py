"""`slmops bundle`, `bundle-adapter`, `inspect`, `keys init`, `sign`, `verify`, `push`, `pull`."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from slmops.cli._output import emit_json, handled, human_bytes, out_console

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="SLMOPS_TOKEN", help="bearer token for the registry (the control plane's)"
    ),
]
keys_app = typer.Typer(help="Signing keys (ed25519).", no_args_is_help=True)


def _plain(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: _plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    return obj


def bundle_command(
    variants: Annotated[Path, typer.Argument(help="the --out folder of `slmops optimize`")],
    report: Annotated[
        Path, typer.Option("--report", help="the report folder of `slmops evaluate`")
    ],
    name: Annotated[
        str, typer.Option("--name", help="model name (lowercase, OCI repository style)")
    ],
    version: Annotated[str, typer.Option("--version", help="semantic version, e.g. 1.2.0")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="bundle folder (or .tar with --format tar)")
    ],
    fmt: Annotated[
        str, typer.Option("--format", help="layout (a folder) or tar (one file)")
    ] = "layout",
    as_json: JsonOpt = False,
) -> None:
    """Package every variant, its lineage card and the eval report as one OCI artifact."""
    with handled(as_json):
        from slmops.bundle.build import build_bundle
        from slmops.core.errors import ConfigError

        if fmt not in ("layout", "tar"):
            raise ConfigError(f"unknown --format {fmt!r}", hint="use layout or tar")
        res = build_bundle(variants, report, name=name, version=version, out=out, format=fmt)
        if as_json:
            emit_json(_plain(res))
            return
        out_console.print(f"bundle [bold]{name}:{version}[/] written to {res.path}")
        out_console.print(f"digest [bold]{res.digest}[/]")


def bundle_adapter_command(
    adapter: Annotated[Path, typer.Argument(help="the --out folder of `slmops adapt`")],
    base: Annotated[
        str, typer.Option("--base", help="the base bundle: its folder or oci://HOST/NAME:VERSION")
    ],
    name: Annotated[str, typer.Option("--name", help="adapter name (OCI repository style)")],
    version: Annotated[str, typer.Option("--version", help="adapter version, e.g. 1.0.0")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the adapter artifact")],
    variant: Annotated[
        list[str] | None,
        typer.Option("--variant", help="base variant(s) to fit (default: every GGUF one)"),
    ] = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Package a LoRA adapter as a signed-able OCI artifact whose subject is its base bundle."""
    with handled(as_json):
        from slmops.bundle.adapter import build_adapter_bundle

        res = build_adapter_bundle(
            adapter, base, name=name, version=version, out=out, variants=variant, token=token
        )
        if as_json:
            emit_json(_plain(res))
            return
        out_console.print(f"adapter [bold]{name}:{version}[/] for {res.base} written to {out}")
        out_console.print(f"digest [bold]{res.digest}[/]; fits {', '.join(res.variants)}")
        for v, why in res.skipped.items():
            out_console.print(f"  not for {v}: {why}")


def inspect_command(
    bundle: Annotated[Path, typer.Argument(help="bundle folder or .tar")],
    as_json: JsonOpt = False,
) -> None:
    """Show a bundle's variants, their descriptors and the selection per device profile."""
    with handled(as_json):
        from slmops.bundle.inspect import inspect_bundle

        info = inspect_bundle(bundle)
        if as_json:
            emit_json(_plain(info))
            return
        if info.get("kind") == "adapter":
            base = info["base"]
            out_console.print(
                f"[bold]adapter {info['name']}:{info['version']}[/]  {info['digest']}"
            )
            out_console.print(f"base {base['name']}:{base['version']} {base['bundle_digest']}")
            fits = ", ".join(v["name"] for v in info["fits_variants"])
            out_console.print(
                f"fits {fits}; rank {info['rank']}, {info['target_tensors']} tensors, "
                f"{human_bytes(info['adapter_bytes'])}"
            )
            signers = ", ".join(info.get("signed_by") or []) or "none"
            out_console.print(f"signatures (not verified here; use slmops verify): {signers}")
            return
        out_console.print(f"[bold]{info['name']}:{info['version']}[/]  {info['digest']}")
        signed = info.get("signed_by") or []
        out_console.print(
            f"signatures (not verified here; use slmops verify): {', '.join(signed) or 'none'}"
        )
        t = Table(title="variants")
        for col in (
            "variant",
            "runtime",
            "quant",
            "disk",
            "RAM at ctx",
            "KLD",
            "selected for",
            "fits (profiles)",
        ):
            t.add_column(col, no_wrap=col == "variant")
        for v in info["variants"]:
            d = v.get("descriptor", v)
            ram = d.get("ram_bytes")
            t.add_row(
                d["name"],
                d["runtime"],
                d.get("quantization") or "-",
                human_bytes(d["disk_bytes"]),
                f"{human_bytes(ram)} @ {d.get('ram_context_tokens')}" if ram else "-",
                f"{d['kld_mean']:.2g}" if d.get("kld_mean") is not None else "-",
                ", ".join(d.get("selected_for") or []) or "-",
                str(len(d.get("fits") or [])),
            )
        out_console.print(t)
        for profile, variant in (info.get("selection") or {}).items():
            out_console.print(f"  {profile}: {variant or 'no variant fits'}")


@keys_app.command("init")
def keys_init(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the key pair")] = Path(
        "keys"
    ),
    name: Annotated[str, typer.Option(help="file name stem")] = "slmops",
    as_json: JsonOpt = False,
) -> None:
    """Create an ed25519 key pair (private key mode 0600, public key NAME.pub)."""
    with handled(as_json):
        from slmops.bundle.signing import fingerprint_file, init_keys

        private, public = init_keys(out, name=name)
        info = {
            "private_key": str(private),
            "public_key": str(public),
            "fingerprint": fingerprint_file(public),
        }
        if as_json:
            emit_json(info)
            return
        out_console.print(
            f"private key {private} (keep it secret; mode 0600)\npublic key  {public}"
        )
        out_console.print(f"fingerprint {info['fingerprint']}")


def sign_command(
    bundle: Annotated[Path, typer.Argument(help="bundle folder or .tar")],
    key: Annotated[Path, typer.Option("--key", help="private key from `slmops keys init`")],
    as_json: JsonOpt = False,
) -> None:
    """Sign the bundle digest (covering every manifest, layer, card and the eval report)."""
    with handled(as_json):
        from slmops.bundle.signing import sign_bundle

        info = sign_bundle(bundle, key)
        if as_json:
            emit_json(_plain(info))
            return
        data = _plain(info)
        out_console.print(f"signed {data.get('bundle_digest')} with key {data.get('key')}")


def verify_command(
    bundle: Annotated[Path, typer.Argument(help="bundle folder or .tar")],
    trust: Annotated[list[Path], typer.Option("--trust", help="trusted public key (repeatable)")],
    as_json: JsonOpt = False,
) -> None:
    """Check every blob's digest and size, the manifests, and the signature; exit 1 on failure."""
    with handled(as_json):
        from slmops.bundle.verify import verify_bundle

        res = verify_bundle(bundle, trust)
        if as_json:
            emit_json({"ok": True, **_plain(res)})
            return
        data = _plain(res)
        out_console.print(
            f"[bold green]verified[/] {data.get('name')}:{data.get('version')} {data.get('digest')}"
        )
        out_console.print(f"signed by {', '.join(data.get('signed_by') or [])}")


def push_command(
    bundle: Annotated[Path, typer.Argument(help="bundle folder")],
    ref: Annotated[str, typer.Argument(help="oci://HOST:PORT/REPO:TAG")],
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Push a bundle to an OCI registry; blobs the registry has are skipped."""
    with handled(as_json):
        from slmops.bundle.registry import push

        stats = push(_as_layout(bundle), ref, token=token)
        if as_json:
            emit_json(_plain(stats))
            return
        s = _plain(stats)
        out_console.print(
            f"pushed {ref}: {s['blobs_uploaded']} blobs uploaded ({human_bytes(s['bytes_uploaded'])}), "
            f"{s['blobs_skipped']} already there; digest {s['digest']}"
        )


def pull_command(
    ref: Annotated[str, typer.Argument(help="oci://HOST:PORT/REPO:TAG or @sha256:...")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the bundle")],
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Pull a bundle (resuming an interrupted pull); verify it with `slmops verify`."""
    with handled(as_json):
        from slmops.bundle.registry import pull

        stats = pull(ref, out, token=token)
        if as_json:
            emit_json(_plain(stats))
            return
        s = _plain(stats)
        out_console.print(
            f"pulled {ref} into {out}: {s['blobs_downloaded']} blobs, {human_bytes(s['bytes_downloaded'])}"
            f" ({human_bytes(s['bytes_resumed'])} resumed); digest {s['digest']}"
        )


def _as_layout(bundle: Path) -> Path:
    from slmops.core.errors import UserInputError

    if bundle.is_file():
        raise UserInputError(
            "push takes a bundle folder",
            where=bundle,
            hint="build with --format layout, or extract the tar first",
        )
    return bundle
