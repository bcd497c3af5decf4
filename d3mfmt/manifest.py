"""The manifest: typed, frozen sections, parsed and checked field by field.

``Manifest.from_json`` accepts exactly what spec/SPEC.md ("Manifest fields")
allows and raises ``D3MFormatError`` naming the field otherwise; unknown keys
are ignored (a minor version may add optional ones). ``Manifest.to_json`` gives
the canonical bytes the writer stores.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

from .container import PAYLOAD_MEMBERS
from .errors import D3MFormatError
from .jsonfields import Fields, canonical_float, check_text, check_tree, loads
from .labels import LabelEncoding
from .renderable import check_geometry
from .schedulers import PIPELINES, check_scheduler_config

FORMAT_NAME = "d3m"
FORMAT_VERSION = (1, 0)

# Limits (SPEC.md "Limits"): checked before anything is allocated from them.
MAX_MANIFEST_BYTES = 16 << 20
MAX_CLASSES = 100_000
MAX_IPC = 10_000
MAX_GRID = 16
MAX_VECTORS = 64
MAX_DIM = 16_384
MAX_IMAGE_SIDE = 4096
MAX_STEPS = 1000
MAX_ROWS = 1 << 28  # label rows = classes * ipc * grid**2
MAX_FINGERPRINT_SIDE = 16
MAX_JSON_CONTAINERS = 1_000_000  # objects + arrays: 64+ bytes each once parsed (100,000 classes need 300,000)

EMBEDDING_DTYPES = ("float16", "float32")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
RNG_RULE = "torch-cpu-float32"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VARIANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # generator.model.variant (SPEC "Manifest fields")


@dataclass(frozen=True)
class ClassInfo:
    """One class: a stable id (e.g. a WordNet id) and a human-readable name."""

    id: str
    name: str

    def __post_init__(self):
        # a folder name that is not UTF-8 arrives with unpaired surrogates: refuse it where classes are made
        for what, value in (("id", self.id), ("name", self.name)):
            if isinstance(value, str):
                check_text(value, f"class {what}")  # lengths and types: Manifest.from_dict


@dataclass(frozen=True)
class SourceInfo:
    """Where the real images came from."""

    name: str
    fingerprint: str | None = None  # e.g. "sha256:<hex>" of the source listing
    license: str | None = None


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[ClassInfo, ...]
    ipc: int  # distilled images per class
    grid: int  # each image is a grid x grid collage of patches
    source: SourceInfo | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def patches_per_image(self) -> int:
        return self.grid * self.grid

    @property
    def num_images(self) -> int:
        return self.num_classes * self.ipc

    @property
    def num_patches(self) -> int:
        return self.num_images * self.patches_per_image


@dataclass(frozen=True)
class ModelRef:
    """The diffusion model: hub-style id or built-in id, revision, content hash."""

    id: str
    revision: str | None = None
    identity: str | None = None  # "files-sha256:<hex>" over the files rendering loads (SPEC "Model identity")
    variant: str | None = None  # weight-file variant ("fp16"); None: the plain files. Written only when set.


@dataclass(frozen=True)
class GeneratorInfo:
    """Everything the regeneration rule (SPEC.md "Regeneration") needs."""

    model: ModelRef
    scheduler: str  # diffusers scheduler class name, deterministic (e.g. DDIMScheduler)
    scheduler_config: dict
    steps: int
    guidance_scale: float
    height: int
    width: int
    latent_shape: tuple[int, int, int]
    prompt_template: str
    placeholder: str = "{token}"
    negative_prompt: str = ""
    eta: float = 0.0
    dtype: str = "float32"  # compute dtype the builder labelled with
    pipeline: str = "StableDiffusionPipeline"
    rng: str = RNG_RULE

    def __post_init__(self):
        # canonical at construction: guidance_scale=1 given in code is the 1.0 a reload gives (same bytes, same hash)
        for name in ("guidance_scale", "eta"):
            object.__setattr__(self, name, canonical_float(getattr(self, name)))


@dataclass(frozen=True)
class EmbeddingInfo:
    n_vectors: int
    dim: int
    dtype: str = "float16"


@dataclass(frozen=True)
class TeacherInfo:
    name: str
    identity: str | None = None
    accuracy: float | None = None  # on real held-out data, in [0, 1]

    def __post_init__(self):
        object.__setattr__(self, "accuracy", canonical_float(self.accuracy))


@dataclass(frozen=True)
class MemberInfo:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The typed manifest. ``members`` is filled in by the writer."""

    dataset: DatasetInfo
    generator: GeneratorInfo
    embeddings: EmbeddingInfo
    labels: LabelEncoding
    teacher: TeacherInfo | None = None
    fingerprint_size: int | None = None  # F of the [C, IPC, F, F] fingerprints
    build: dict = field(default_factory=dict)
    members: dict[str, MemberInfo] = field(default_factory=dict)
    version: tuple[int, int] = FORMAT_VERSION

    def with_members(self, members: dict[str, MemberInfo]) -> "Manifest":
        return replace(self, members=dict(members))

    def check(self) -> None:
        """Cross-field checks; raise D3MFormatError."""
        ds, gen = self.dataset, self.generator
        if ds.num_patches > MAX_ROWS:
            raise D3MFormatError(f"manifest.json: classes * ipc * grid^2 = {ds.num_patches} exceeds {MAX_ROWS}")
        if gen.height % ds.grid or gen.width % ds.grid:
            raise D3MFormatError(
                f"manifest.json: generator.height/width ({gen.height}x{gen.width}) must be divisible by dataset.grid ({ds.grid})"
            )
        if self.fingerprint_size is not None and (gen.height % self.fingerprint_size or gen.width % self.fingerprint_size):
            raise D3MFormatError(
                f"manifest.json: fingerprints.size {self.fingerprint_size} must divide generator.height/width ({gen.height}x{gen.width})"
            )
        if gen.prompt_template.count(gen.placeholder) != 1:
            raise D3MFormatError(
                f"manifest.json: generator.prompt_template must contain generator.placeholder {gen.placeholder!r} exactly once, "
                f"got {gen.prompt_template!r}"
            )
        if len({c.id for c in ds.classes}) != ds.num_classes:
            raise D3MFormatError("manifest.json: dataset.classes ids must be unique")
        check_geometry(gen, self.embeddings.dim)
        self.labels.check(ds.num_classes)

    # -- JSON ---------------------------------------------------------------

    def to_dict(self) -> dict:
        ds, gen, emb, lab = self.dataset, self.generator, self.embeddings, self.labels
        return {
            "format": FORMAT_NAME,
            "version": f"{self.version[0]}.{self.version[1]}",
            "dataset": {
                "name": ds.name,
                "classes": [{"id": c.id, "name": c.name} for c in ds.classes],
                "ipc": ds.ipc,
                "grid": ds.grid,
                "source": None
                if ds.source is None
                else {"name": ds.source.name, "fingerprint": ds.source.fingerprint, "license": ds.source.license},
            },
            "generator": generator_to_dict(gen),
            "embeddings": {"n_vectors": emb.n_vectors, "dim": emb.dim, "dtype": emb.dtype},
            "labels": {"encoding": lab.kind, "k": lab.k, "values": lab.values, "temperature": lab.temperature},
            "teacher": None
            if self.teacher is None
            else {"name": self.teacher.name, "identity": self.teacher.identity, "accuracy": self.teacher.accuracy},
            "fingerprints": None if self.fingerprint_size is None else {"size": self.fingerprint_size},
            "members": {name: {"size": m.size, "sha256": m.sha256} for name, m in sorted(self.members.items())},
            "build": self.build,
        }

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, no whitespace, UTF-8, trailing newline (``d3m-inspect --json`` is the readable view)."""
        doc = self.to_dict()
        check_tree(doc)  # the reader's rules on every value: no surrogates, no inf, bounded depth
        try:
            text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise D3MFormatError(f"manifest.json: cannot be written as JSON ({exc})") from None
        return (text + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> "Manifest":
        if len(raw) > MAX_MANIFEST_BYTES:
            raise D3MFormatError(f"manifest.json: {len(raw)} bytes exceeds the limit of {MAX_MANIFEST_BYTES}")
        raw = bytes(raw)
        containers = raw.count(b"{") + raw.count(b"[")  # an upper bound (brackets inside strings count too)
        if containers > MAX_JSON_CONTAINERS:
            raise D3MFormatError(f"manifest.json: holds up to {containers:,} objects and arrays, over the limit of "
                                 f"{MAX_JSON_CONTAINERS:,} (each costs memory once parsed)")
        return cls.from_dict(loads(raw))

    @classmethod
    def from_dict(cls, doc) -> "Manifest":
        check_tree(doc)
        r = Fields(doc, "")
        if r.str("format") != FORMAT_NAME:
            raise D3MFormatError(f"manifest.json: format must be {FORMAT_NAME!r}, got {doc.get('format')!r}")
        version = parse_version(r.str("version"))
        ds = r.obj("dataset")
        classes = tuple(
            ClassInfo(id=c.str("id", max_len=256), name=c.str("name", max_len=256))
            for c in ds.list_of_obj("classes", 1, MAX_CLASSES)
        )
        src = ds.obj("source", optional=True)
        dataset = DatasetInfo(
            name=ds.str("name"),
            classes=classes,
            ipc=ds.int("ipc", 1, MAX_IPC),
            grid=ds.int("grid", 1, MAX_GRID),
            source=None
            if src is None
            else SourceInfo(src.str("name"), src.str("fingerprint", optional=True), src.str("license", optional=True)),
        )
        generator = _parse_generator(r.obj("generator"))
        e = r.obj("embeddings")
        embeddings = EmbeddingInfo(
            n_vectors=e.int("n_vectors", 1, MAX_VECTORS), dim=e.int("dim", 1, MAX_DIM), dtype=e.choice("dtype", EMBEDDING_DTYPES)
        )
        lab = r.obj("labels")
        labels = LabelEncoding(
            kind=lab.str("encoding"),
            k=lab.int("k", 1, MAX_CLASSES, optional=True),
            values=lab.str("values", optional=True),
            temperature=lab.num("temperature", 1e-6, 1e6),
        )
        t = r.obj("teacher", optional=True)
        teacher = (
            None
            if t is None
            else TeacherInfo(t.str("name"), t.str("identity", optional=True), t.num("accuracy", 0.0, 1.0, optional=True))
        )
        fp = r.obj("fingerprints", optional=True)
        members = {}
        listed = r.obj("members")
        unknown = sorted(set(listed.doc) - set(PAYLOAD_MEMBERS))
        if unknown:  # no container member has that name: another reader might hash it, or trust it
            raise D3MFormatError(f"manifest.json: members may hold only {list(PAYLOAD_MEMBERS)}, got {unknown[:4]} "
                                 "as well (the member set is fixed by the major version)"[:500])
        for name, m in listed.items():
            sha = m.str("sha256")
            if not _SHA256.match(sha):
                raise D3MFormatError(f"manifest.json: members.{name}.sha256 must be 64 lowercase hex digits, got {sha!r}")
            members[name] = MemberInfo(size=m.int("size", 0, (1 << 32) - 1), sha256=sha)
        manifest = cls(
            dataset=dataset,
            generator=generator,
            embeddings=embeddings,
            labels=labels,
            teacher=teacher,
            fingerprint_size=None if fp is None else fp.int("size", 1, MAX_FINGERPRINT_SIDE),
            build=r.raw_obj("build", optional=True) or {},
            members=members,
            version=version,
        )
        manifest.check()
        return manifest


def _parse_generator(g: Fields) -> GeneratorInfo:
    model, sched = g.obj("model"), g.obj("scheduler")
    scheduler, config, steps = sched.str("class"), sched.raw_obj("config"), g.int("steps", 1, MAX_STEPS)
    check_scheduler_config(scheduler, config, steps)
    return GeneratorInfo(
        pipeline=g.choice("pipeline", PIPELINES),
        model=_parse_model_ref(model),
        scheduler=scheduler,
        scheduler_config=config,
        steps=steps,
        guidance_scale=g.num("guidance_scale", 0.0, 100.0),
        eta=g.num("eta", 0.0, 0.0),
        height=g.int("height", 1, MAX_IMAGE_SIDE),
        width=g.int("width", 1, MAX_IMAGE_SIDE),
        latent_shape=tuple(g.int_list("latent_shape", 3, 1, MAX_IMAGE_SIDE)),
        dtype=g.choice("dtype", COMPUTE_DTYPES),
        prompt_template=g.str("prompt_template"),
        placeholder=g.str("placeholder", min_len=1),
        negative_prompt=g.str("negative_prompt", min_len=0),
        rng=g.choice("rng", (RNG_RULE,)),
    )


def generator_to_dict(gen: GeneratorInfo) -> dict:
    """The manifest's ``generator`` object for ``gen``."""
    return {
        "pipeline": gen.pipeline,
        "model": _model_ref_to_dict(gen.model),
        "scheduler": {"class": gen.scheduler, "config": gen.scheduler_config},
        "steps": gen.steps,
        "guidance_scale": gen.guidance_scale,
        "eta": gen.eta,
        "height": gen.height,
        "width": gen.width,
        "latent_shape": list(gen.latent_shape),
        "dtype": gen.dtype,
        "prompt_template": gen.prompt_template,
        "placeholder": gen.placeholder,
        "negative_prompt": gen.negative_prompt,
        "rng": gen.rng,
    }


def _parse_model_ref(model: Fields) -> ModelRef:
    variant = model.str("variant", optional=True, max_len=64)
    if variant is not None and not _VARIANT.match(variant):
        raise model._fail("variant", "a variant name of letters, digits, '_' and '-' (e.g. 'fp16')", variant)
    return ModelRef(model.str("id"), model.str("revision", optional=True), model.str("identity", optional=True), variant)


def _model_ref_to_dict(ref: ModelRef) -> dict:
    """``generator.model``; ``variant`` only when set, so archives without one keep their bytes and content hash."""
    doc = {"id": ref.id, "revision": ref.revision, "identity": ref.identity}
    if ref.variant is not None:
        doc["variant"] = ref.variant
    return doc


def generator_from_dict(doc: dict) -> GeneratorInfo:
    """Parse and check a ``generator`` object on its own (raises D3MFormatError)."""
    check_tree(doc, "generator")
    return _parse_generator(Fields(doc, "generator"))


def parse_version(text: str) -> tuple[int, int]:
    """"MAJOR.MINOR" -> (major, minor); refuse a major this reader does not know."""
    m = re.fullmatch(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})", text)
    if not m:
        raise D3MFormatError(f"manifest.json: version must look like '1.0', got {text!r}")
    major, minor = int(m.group(1)), int(m.group(2))
    if major != FORMAT_VERSION[0]:
        raise D3MFormatError(
            f"manifest.json: format major version {major} is not supported (expected {FORMAT_VERSION[0]}); "
            "upgrade d3mfmt to read this archive"
        )
    return major, minor
