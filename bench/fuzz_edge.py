"""Property-based fuzzing of `ipsr serve`'s HTTP edge (issue #28): hostile requests, checked invariants.

    IPSR_SERVE_TOKEN=… python bench/fuzz_edge.py --url http://127.0.0.1:8000 --examples 2000

Requests are drawn by ``hypothesis``: malformed and truncated multipart bodies, wrong or missing content types,
zero-byte and non-image files, truncated PNG/JPEG/GIF/TIFF/WebP, headers claiming huge dimensions, animated
images, odd colour modes, unicode and very long identity names, path-like gallery names, duplicated fields, huge
or non-numeric query values, wrong or missing tokens, oversized headers. After every request (``check``):
- no 5xx but 503 (overload), every 4xx a JSON ``detail`` of one line;
- a 200 enrolment is in the gallery (size grew by exactly what it says it enrolled), a refused one changed nothing;
- a 200 identity delete leaves the identity absent.
At the end the service answers ``/v1/healthz``. ``tests/test_serve.py`` runs the same properties with a small,
derandomised budget against its own service; this script is the long, random run (figures in RESULTS.md).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

FUZZ_GALLERY = "fuzz"
PEOPLE = ("alice", "bob", "carol")  # the identities valid enrolments use, so deletes can hit them
TIMEOUT = 120


# --- payloads -------------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _face(side_h: int, side_w: int, mode: str, seed: int) -> Image.Image:
    """A face-like gradient (not noise: decoders and the model see a plausible image) in ``mode``."""
    g = Image.linear_gradient("L").resize((side_w, side_h)).rotate(seed % 360)
    rgb = Image.merge("RGB", (g, g.transpose(Image.Transpose.FLIP_LEFT_RIGHT), g.point(lambda v: 255 - v)))
    if mode == "I;16":
        return g.convert("I").point(lambda v: v * 256).convert("I;16")
    return rgb.convert(mode) if mode != "RGB" else rgb


def png_claiming(height: int, width: int) -> bytes:
    """A valid PNG signature + IHDR declaring ``height``×``width`` and one tiny IDAT: a decompression bomb's header
    without the bomb (a decoder that trusts it would allocate gigabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def animated_gif(h: int, w: int) -> bytes:
    frames = [_face(h, w, "P", s) for s in (0, 90, 180)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


FORMATS = {"PNG": {}, "JPEG": {"quality": 80}, "GIF": {}, "TIFF": {}, "WEBP": {}, "BMP": {}}
MODES = ("RGB", "L", "RGBA", "LA", "P", "1", "CMYK", "I;16")


@st.composite
def images(draw) -> bytes:
    """Valid images of every colour mode and container, and the same truncated."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(MODES))
    if (fmt, mode) in {("JPEG", "RGBA"), ("JPEG", "LA"), ("JPEG", "P"), ("JPEG", "I;16"), ("GIF", "I;16"),
                       ("WEBP", "I;16"), ("WEBP", "CMYK"), ("BMP", "CMYK"), ("BMP", "LA"), ("BMP", "I;16"),
                       ("GIF", "CMYK"), ("PNG", "CMYK"), ("WEBP", "LA"), ("WEBP", "P")}:  # fmt: skip
        mode = "RGB"  # combinations Pillow cannot write
    h, w = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    data = _encode(_face(h, w, mode, draw(st.integers(0, 359))), fmt, **FORMATS[fmt])
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]  # truncated anywhere, header included
    return data


def payloads() -> st.SearchStrategy[bytes]:
    return st.one_of(
        images(),
        st.builds(png_claiming, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)),
        st.builds(animated_gif, st.integers(8, 64), st.integers(8, 64)),
        st.just(b""),
        st.just(b"\xff\xd8\xff" + b"\0" * (3 * 2**20)),  # past the body cap (413) and any per-image cap
        st.binary(max_size=2048),
        st.text(max_size=200).map(str.encode),
    )


# --- requests ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    route: str  # enroll, identify, superresolve, info, delete_id, delete_gallery
    method: str
    path: str
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    gallery: str | None = None  # the gallery the request may change (enrol, identity delete)
    identity: str | None = None  # an identity delete's target


NAMES = st.one_of(
    st.sampled_from([FUZZ_GALLERY, FUZZ_GALLERY, FUZZ_GALLERY, "..", ".", "a..b", "%2e%2e", "con", "x" * 300, "é"]),
    st.text(min_size=1, max_size=40).filter(lambda s: "/" not in s and "?" not in s and "#" not in s),
)
IDENTITIES = st.one_of(st.sampled_from(PEOPLE), st.text(max_size=20), st.text(min_size=250, max_size=400))
QUERY = st.one_of(st.integers(-(2**63), 2**63), st.text(max_size=30), st.sampled_from(["true", "false", "auto"]))


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    """A multipart body from (field, filename or None, value): written by hand so it can also be malformed."""
    out = []
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        kind = "Content-Type: application/octet-stream\r\n" if filename is not None else ""
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + value + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode()


@st.composite
def form_body(draw, enrol: bool) -> tuple[bytes, str]:
    n = draw(st.integers(1, 4) | st.just(200))  # 200: past max_images, the form parser's file cap
    files = [("image", draw(st.sampled_from(["a.png", "", "../../etc/passwd", "ü" * 80])), draw(payloads()))
             for _ in range(min(n, 4))]  # fmt: skip
    files = (files * n)[:n]
    texts = [("identity", None, draw(IDENTITIES).encode()) for _ in range(n if enrol else 0)]
    extra = draw(st.lists(st.tuples(st.sampled_from(["identity", "image_id", "image", "zz"]), st.none(),
                                    st.text(max_size=300).map(str.encode)), max_size=3))  # fmt: skip
    body = multipart(files + texts + extra, "fuzzboundary")
    mangle = draw(st.sampled_from(["none", "none", "truncate", "no-boundary", "wrong-boundary"]))
    ctype = "multipart/form-data; boundary=fuzzboundary"
    if mangle == "truncate":
        body = body[: draw(st.integers(0, len(body)))]
    elif mangle == "no-boundary":
        ctype = "multipart/form-data"
    elif mangle == "wrong-boundary":
        ctype = "multipart/form-data; boundary=other"
    return body, ctype


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def json_body(draw, enrol: bool) -> tuple[bytes, str]:
    def item():
        data = draw(st.one_of(payloads().map(lambda b: base64.b64encode(b).decode()), st.text(max_size=40), JSONISH))
        entry = {"data": data, "name": draw(st.one_of(st.text(max_size=300), JSONISH))}
        if enrol or draw(st.booleans()):
            entry["identity"] = draw(st.one_of(IDENTITIES, JSONISH))
        if draw(st.booleans()):
            entry["image_id"] = draw(st.one_of(st.text(max_size=300), JSONISH))
        return entry

    shape = draw(st.sampled_from(["images", "images", "images", "other", "broken"]))
    if shape == "images":
        text = json.dumps({"images": [item() for _ in range(draw(st.integers(0, 4)))]})
    elif shape == "other":
        text = json.dumps(draw(JSONISH))
    else:
        text = json.dumps({"images": [item()]})[: draw(st.integers(0, 40))]
    return text.encode(), draw(st.sampled_from(["application/json", "application/json; charset=latin-1"]))


@st.composite
def cases(draw, token: str) -> Case:
    route = draw(st.sampled_from(["enroll", "enroll", "identify", "identify", "superresolve", "info", "delete_id",
                                  "delete_gallery"]))  # fmt: skip
    name = draw(NAMES)
    auth = draw(st.sampled_from(["ok"] * 8 + ["missing", "wrong", "scheme", "empty"]))
    headers = {"ok": {"Authorization": f"Bearer {token}"}, "missing": {}, "wrong": {"Authorization": "Bearer nope"},
               "scheme": {"Authorization": f"Basic {token}"}, "empty": {"Authorization": "Bearer "}}[auth]  # fmt: skip
    if draw(st.integers(0, 19)) == 0:
        headers["X-Fuzz-Pad"] = "a" * draw(st.integers(1, 200_000))  # oversized headers
    if route in ("info", "delete_id", "delete_gallery"):
        if route == "info":
            params = {"offset": draw(QUERY), "limit": draw(QUERY)}
            return Case(route, "GET", f"/v1/galleries/{name}", params, headers)
        if route == "delete_gallery":  # names no test's gallery has: the deletes fuzz the name checks and 404s
            name = f"zz-{name}"
            return Case(route, "DELETE", f"/v1/galleries/{name}", {}, headers)
        identity = draw(IDENTITIES.filter(lambda s: s and "/" not in s and "?" not in s and "#" not in s))
        return Case(route, "DELETE", f"/v1/galleries/{name}/identities/{identity}", {}, headers, gallery=name,
                    identity=identity)  # fmt: skip
    enrol = route == "enroll"
    body, ctype = draw(st.one_of(form_body(enrol), json_body(enrol),
                                 st.tuples(payloads(), st.sampled_from(["image/png", "text/plain", ""]))))  # fmt: skip
    if ctype:
        headers["Content-Type"] = ctype
    if enrol:
        params = {"aligned": draw(st.one_of(st.just("true"), QUERY))}
        return Case(route, "POST", f"/v1/galleries/{name}/enroll", params, headers, body, gallery=name)
    if route == "identify":
        params = {k: draw(QUERY) for k in draw(st.sets(st.sampled_from(["top_k", "super_resolve", "return_image"])))}
        return Case(route, "POST", f"/v1/galleries/{name}/identify", params, headers, body)
    return Case(route, "POST", "/v1/superresolve", {}, headers, body)


# --- invariants -------------------------------------------------------------------------------------------------


def gallery_state(base: str, token: str, name: str) -> tuple[int, frozenset] | None:
    """(faces, identities) of gallery ``name``, None if it does not exist (or its name is refused)."""
    r = requests.get(f"{base}/v1/galleries/{name}", params={"limit": 10_000},
                     headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT)  # fmt: skip
    if r.status_code != 200:
        return None
    body = r.json()
    return body["size"], frozenset(p["identity"] for p in body["page"])


def send(base: str, case: Case) -> requests.Response | None:
    """The response, or None when the server refused the request at the HTTP layer (only for oversized headers)."""
    try:
        return requests.request(case.method, base + case.path, params=case.params, headers=case.headers,
                                data=case.body, timeout=TIMEOUT)  # fmt: skip
    except requests.ConnectionError:
        if "X-Fuzz-Pad" in case.headers:
            return None
        raise


def check(base: str, token: str, case: Case, stats: Counter | None = None) -> None:
    """Send ``case`` and assert the edge's invariants (module docstring); raises AssertionError naming the case."""
    before = gallery_state(base, token, case.gallery) if case.gallery else None
    response = send(base, case)
    where = f"{case.method} {case.path[:120]} params={str(case.params)[:200]}"
    if stats is not None:
        stats[(case.route, response.status_code if response is not None else "dropped")] += 1
    if response is None:
        return
    status = response.status_code
    assert status < 500 or status == 503, f"{where}: {status} {response.text[:500]}"
    if 400 <= status < 500:  # what was wrong, in one line: the request's, or each image's
        body = response.json()
        said = [body["detail"]] if "detail" in body else [r["detail"] for r in body.get("rejects", [])]
        said += [r["error"]["detail"] for r in body.get("results", []) if "error" in r]
        assert said and all(isinstance(d, str) and d and "\n" not in d for d in said), f"{where}: {status} {body}"
    if not case.gallery:
        return
    after = gallery_state(base, token, case.gallery)
    if case.method == "POST" and status == 200:
        grew = (after[0] if after else 0) - (before[0] if before else 0)
        assert grew == response.json()["enrolled"], f"{where}: answered {response.json()['enrolled']}, grew {grew}"
    elif case.method == "DELETE" and status == 200:
        assert after is None or case.identity not in after[1], f"{where}: deleted identity still listed"
    else:
        assert after == before, f"{where}: refused ({status}) but the gallery changed {before} -> {after}"


def seed_gallery(base: str, token: str) -> None:
    """One face per person in ``FUZZ_GALLERY``, so identify requests reach the model and deletes can succeed."""
    files = [("image", (f"{p}.png", _encode(_face(128, 128, "RGB", i * 40), "PNG"), "image/png")) for i, p in
             enumerate(PEOPLE)]  # fmt: skip
    r = requests.post(f"{base}/v1/galleries/{FUZZ_GALLERY}/enroll", params={"aligned": "true"}, files=files,
                      data=[("identity", p) for p in PEOPLE], headers={"Authorization": f"Bearer {token}"},
                      timeout=TIMEOUT)  # fmt: skip
    assert r.status_code == 200, r.text


def fuzz(base: str, token: str, examples: int, derandomize: bool, stats: Counter | None = None) -> None:
    """Run ``examples`` drawn cases through ``check``; hypothesis shrinks a failure to a minimal request."""

    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)  # fmt: skip
    @given(cases(token))
    def run(case: Case) -> None:
        check(base, token, case, stats)

    seed_gallery(base, token)
    run()
    r = requests.get(f"{base}/v1/healthz", timeout=30)
    assert r.status_code == 200, f"after fuzzing, /v1/healthz answers {r.status_code}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="a running ipsr serve, e.g. http://127.0.0.1:8000")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--token-env", default="IPSR_SERVE_TOKEN")
    args = parser.parse_args()
    token = os.environ.get(args.token_env, "")
    stats: Counter = Counter()
    began = time.monotonic()
    fuzz(args.url.rstrip("/"), token, args.examples, derandomize=False, stats=stats)
    print(f"{sum(stats.values())} requests in {time.monotonic() - began:.0f} s, every invariant held; by route:")
    for (route, status), n in sorted(stats.items(), key=str):
        print(f"  {route:15} {status}: {n}")


if __name__ == "__main__":
    main()
