"""Media types and annotation keys of slmops bundles (OCI image spec 1.1 artifacts).

Layout of one bundle (one model version):

    index.json                       top-level pointer (unsigned): the bundle index + signatures
    └── bundle index (image index)   THE signed object: its digest is the bundle digest
        ├── variant manifest x N     artifactType VARIANT; config = VariantDescriptor;
        │                            layers = files (weights, tokenizer, runtime config, card)
        └── bundle manifest          artifactType BUNDLE; config = BundleInfo;
                                     layers = eval report (json, html, md) and charts
    signature manifest(s)            artifactType SIGNATURE; subject = bundle index;
                                     one layer: the detached ed25519 signature payload

An adapter (bundle/adapter.py) has the same shape with one manifest: its root index has
artifactType ADAPTER and `subject` = the base bundle index; its one manifest (ADAPTER) has an
AdapterDescriptor config and the GGUF LoRA, card and evaluation as layers.
"""

from __future__ import annotations

OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_VERSION = "1.0.0"

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_EMPTY = "application/vnd.oci.empty.v1+json"

ARTIFACT_VARIANT = "application/vnd.slmops.variant.v1"
ARTIFACT_BUNDLE = "application/vnd.slmops.bundle.v1"
ARTIFACT_SIGNATURE = "application/vnd.slmops.signature.v1"
ARTIFACT_ADAPTER = "application/vnd.slmops.adapter.v1"  # a LoRA adapter; subject = base bundle

MT_VARIANT_CONFIG = "application/vnd.slmops.variant.config.v1+json"
MT_BUNDLE_CONFIG = "application/vnd.slmops.bundle.config.v1+json"
MT_SIGNATURE = "application/vnd.slmops.signature.v1+json"
MT_ADAPTER_CONFIG = "application/vnd.slmops.adapter.config.v1+json"
MT_LORA_GGUF = "application/vnd.slmops.lora.gguf"

MT_WEIGHTS_GGUF = "application/vnd.slmops.weights.gguf"
MT_WEIGHTS_ONNX = "application/vnd.slmops.weights.onnx"
MT_WEIGHTS_ONNX_DATA = "application/vnd.slmops.weights.onnx.data"
MT_TOKENIZER = "application/vnd.slmops.tokenizer.v1+json"
MT_RUNTIME_CONFIG = "application/vnd.slmops.runtime-config.v1+json"
MT_CARD = "application/vnd.slmops.card.v1+json"
MT_REPORT_JSON = "application/vnd.slmops.eval-report.v1+json"
MT_REPORT_HTML = "text/html"
MT_REPORT_MD = "text/markdown"
MT_PNG = "image/png"
MT_FILE = "application/octet-stream"

LAYER_TYPES = frozenset(
    {
        MT_WEIGHTS_GGUF,
        MT_WEIGHTS_ONNX,
        MT_WEIGHTS_ONNX_DATA,
        MT_TOKENIZER,
        MT_RUNTIME_CONFIG,
        MT_CARD,
        MT_REPORT_JSON,
        MT_REPORT_HTML,
        MT_REPORT_MD,
        MT_PNG,
        MT_FILE,
        MT_SIGNATURE,
        MT_EMPTY,
        MT_LORA_GGUF,
    }
)
CONFIG_TYPES = frozenset({MT_VARIANT_CONFIG, MT_BUNDLE_CONFIG, MT_ADAPTER_CONFIG, MT_EMPTY})
ARTIFACT_TYPES = frozenset(
    {ARTIFACT_VARIANT, ARTIFACT_BUNDLE, ARTIFACT_SIGNATURE, ARTIFACT_ADAPTER}
)

ANN_TITLE = "org.opencontainers.image.title"  # a layer's file name, relative to the variant folder
ANN_VERSION = "org.opencontainers.image.version"
ANN_CREATED = "org.opencontainers.image.created"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_BUNDLE_NAME = "io.slmops.bundle.name"
ANN_VARIANT = "io.slmops.variant"
ANN_KEY_FINGERPRINT = "io.slmops.signature.key"

# Limits for untrusted input: manifests and configs are small JSON; a declared size above these
# is refused before anything is read.
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 16 << 20
MAX_BLOB_BYTES = 64 << 30


def layer_media_type(relative_name: str) -> str:
    """Media type of a variant file by name: typed layers let a device fetch what it needs."""
    name = relative_name.rsplit("/", 1)[-1]
    if name.endswith(".gguf"):
        return MT_WEIGHTS_GGUF
    if name.endswith(".onnx"):
        return MT_WEIGHTS_ONNX
    if name.endswith((".onnx.data", ".onnx_data")):
        return MT_WEIGHTS_ONNX_DATA
    if name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    ):
        return MT_TOKENIZER
    if name in (
        "genai_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "config.json",
    ):
        return MT_RUNTIME_CONFIG
    if name == "slmops-card.json":
        return MT_CARD
    return MT_FILE
