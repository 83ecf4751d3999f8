"""Export benchmark: `python -m bench.export [--json] [--frames N]`.

Writes a synthetic track.npz (contract schema: a head turning +-25 degrees, nodding, jaw
opening, eyes moving, random expressions; `synthetic_track`) for the stand-in and for the
small synthetic model of tests/synthetic.py (which, unlike the stand-in, has pose
correctives), exports it as GLB (correctives baked and dropped) and as an OBJ sequence, and
reports per case: seconds and their ratio to R (`bench.render`'s 224^2 batch-1 forward +
backward, measured in the same run), the GLB's size, the round-trip error of the GLB (its
skin + morph targets evaluated by `GltfSkinning`, an evaluator independent of
fitter/export.py, against FlameModel's posed vertices, max over all frames, mm) and what the
pose correctives move (max / mean mm: the loss with --correctives drop). With `--blender PY`
(a Python that has `bpy`), the GLBs are also imported with Blender's own glTF importer
(bench/blender_import.py) and its animated mesh compared with FlameModel's, per morph mode.

`GltfSkinning` reads a GLB with pygltflib (the dev extra) and applies glTF 2.0's vertex
skinning: morph targets first, then jointMatrix = world(joint) x inverseBindMatrix per the
spec; tests/test_export.py uses it too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from priors.flame import FlameModel

_COMPONENTS = {5126: np.float32, 5125: np.uint32, 5123: np.uint16, 5121: np.uint8}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}


def synthetic_track(model: FlameModel, n_frames: int = 4, seed: int = 0, fps: float = 25.0) -> dict:
    """A track.npz per the contract's schema (np.savez it): one identity, per-frame expression and
    poses (a head turning up to 25 degrees, nodding, jaw opening, eyes moving), fps, frames, model, recipe."""
    rng = np.random.default_rng(seed)
    T = n_frames
    s = np.linspace(0, 1, T)
    f32 = lambda a: np.asarray(a, np.float32)
    return {
        "shape": f32(rng.normal(0, 1.0, model.n_shape)),
        "albedo": f32(rng.uniform(0.2, 0.9, (model.n_verts, 3))),
        "exp": f32(rng.normal(0, 1.2, (T, model.n_exp))),
        "global_pose": f32(np.stack([0.15 * np.sin(3 * s), np.deg2rad(25) * np.sin(2 * np.pi * s), 0.05 * s], 1)),
        "neck_pose": f32(np.stack([0.2 * np.sin(2 * np.pi * s), 0.1 * s, -0.05 * s], 1)),
        "jaw_pose": f32(np.stack([0.25 * s, 0.02 * s, 0 * s], 1)),
        "eye_pose": f32(rng.normal(0, 0.15, (T, 6))),
        "R": f32(np.tile(np.eye(3), (T, 1, 1))), "t": f32(np.tile([0, 0, 1.0], (T, 1))),
        "landmarks2d": f32(np.zeros((T, 68, 2))), "landmarks2d_target": f32(np.zeros((T, 68, 2))),
        "frame_ok": np.ones(T, bool), "K": f32(np.eye(3)), "fps": np.float32(fps),
        "frames": np.array([f"{i:04d}.png" for i in range(T)]), "model": np.array(model.tag),
        "recipe": np.array("track"),
    }


def flame_vertices(model: FlameModel, track: dict, frames, correctives: bool = True) -> np.ndarray:
    """FlameModel's own forward at `frames` of a track dict, with or without pose correctives: T x V x 3."""
    m = model
    if not correctives:  # the same module with its posedirs buffer zeroed
        m = FlameModel.__new__(FlameModel)
        m.__dict__.update(model.__dict__)
        m._buffers = dict(model._buffers)
        m._buffers["posedirs"] = torch.zeros_like(model.posedirs)
    t = lambda k: torch.as_tensor(track[k][frames])
    with torch.no_grad():
        out = m(torch.as_tensor(track["shape"])[None].expand(len(frames), -1), t("exp"), t("global_pose"),
                t("neck_pose"), t("jaw_pose"), t("eye_pose"))
    return out.vertices.double().numpy()


class GltfSkinning:
    """A GLB read back with pygltflib; accessors decoded from the binary chunk, skinning per glTF 2.0."""

    def __init__(self, path):
        import pygltflib

        self.g = pygltflib.GLTF2().load(str(path))
        self.blob = self.g.binary_blob()

    def data(self, index: int) -> np.ndarray:
        acc = self.g.accessors[index]
        view = self.g.bufferViews[acc.bufferView]
        dtype = np.dtype(_COMPONENTS[acc.componentType])
        n = _WIDTH[acc.type]
        if view.byteStride not in (None, 0, n * dtype.itemsize):
            raise ValueError("interleaved buffer views are not supported by this reader")
        start = (view.byteOffset or 0) + (acc.byteOffset or 0)
        arr = np.frombuffer(self.blob, dtype=dtype, count=acc.count * n, offset=start)
        return arr.reshape(acc.count, n) if n > 1 else arr.copy()

    def _animated(self, node_index: int, path: str):
        for anim in self.g.animations:
            for ch in anim.channels:
                if ch.target.node == node_index and ch.target.path == path:
                    return self.data(anim.samplers[ch.sampler].output)
        return None

    def local_matrix(self, node_index: int, frame: int) -> np.ndarray:
        """The node's local T * R * S at keyframe `frame` (animated paths override the node's TRS)."""
        node = self.g.nodes[node_index]
        t = np.array(node.translation or [0, 0, 0], float)
        q = np.array(node.rotation or [0, 0, 0, 1], float)
        s = np.array(node.scale or [1, 1, 1], float)
        if (at := self._animated(node_index, "translation")) is not None:
            t = at[frame].astype(float)
        if (aq := self._animated(node_index, "rotation")) is not None:
            q = aq[frame].astype(float)
        x, y, z, w = q / np.linalg.norm(q)
        R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        M = np.eye(4)
        M[:3, :3] = R * s
        M[:3, 3] = t
        return M

    def world_matrix(self, node_index: int, frame: int) -> np.ndarray:
        parent = {c: i for i, n in enumerate(self.g.nodes) for c in (n.children or [])}
        M = self.local_matrix(node_index, frame)
        while node_index in parent:
            node_index = parent[node_index]
            M = self.local_matrix(node_index, frame) @ M
        return M

    def mesh_node(self) -> int:
        return next(i for i, n in enumerate(self.g.nodes) if n.mesh is not None)

    def morph_weights(self, node_index: int, frame: int) -> np.ndarray:
        mesh = self.g.meshes[self.g.nodes[node_index].mesh]
        n = len(mesh.primitives[0].targets)
        animated = self._animated(node_index, "weights")
        if animated is not None:
            return animated.reshape(-1, n)[frame].astype(float)
        return np.array(mesh.weights, float)

    def skinned_positions(self, frame: int) -> np.ndarray:
        """Morph targets, then linear blend skinning with jointMatrix = world(joint) @ inverseBind: N x 3."""
        node_index = self.mesh_node()
        node = self.g.nodes[node_index]
        prim = self.g.meshes[node.mesh].primitives[0]
        pos = self.data(prim.attributes.POSITION).astype(float)
        for w, target in zip(self.morph_weights(node_index, frame), prim.targets, strict=True):
            pos = pos + w * self.data(target["POSITION"]).astype(float)
        skin = self.g.skins[node.skin]
        ibm = self.data(skin.inverseBindMatrices).reshape(-1, 4, 4).transpose(0, 2, 1)  # column-major
        mats = np.stack([self.world_matrix(j, frame) @ ibm[k] for k, j in enumerate(skin.joints)])
        joints = self.data(prim.attributes.JOINTS_0).astype(int)
        weights = self.data(prim.attributes.WEIGHTS_0).astype(float)
        M = np.einsum("vk,vkab->vab", weights, mats[joints])
        return np.einsum("vab,vb->va", M[:, :3, :3], pos) + M[:, :3, 3]

    def faces(self) -> np.ndarray:
        prim = self.g.meshes[self.g.nodes[self.mesh_node()].mesh].primitives[0]
        return self.data(prim.indices).reshape(-1, 3).astype(np.int64)


def _models() -> list[tuple[str, FlameModel]]:
    from fitter.fit import load_flame
    from tests.synthetic import synthetic_assets  # run from the repository root

    return [("stand-in", load_flame(None)), ("synthetic", FlameModel(synthetic_assets()))]


def run(n_frames: int = 48) -> dict:
    from bench.render import time_case
    from fitter import export as ex

    models = _models()
    standin = models[0][1]
    r_ms, _ = time_case(standin.v_template.numpy(), standin.faces, 224, 1, torch.device("cpu"), 10)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, model in models:
            track = synthetic_track(model, n_frames=n_frames)
            src = folder / f"{name}.npz"
            np.savez(src, **track)
            full = flame_vertices(model, track, list(range(n_frames)), correctives=True)
            rigid = flame_vertices(model, track, list(range(n_frames)), correctives=False)
            for fmt, mode in (("glb", "bake"), ("glb", "drop"), ("obj", "bake")):
                out = folder / f"{name}_{mode}.{fmt}" if fmt == "glb" else folder / f"{name}_obj"
                start = time.perf_counter()
                report = ex.export_file(src, fmt, out, model=model, correctives=mode)
                seconds = time.perf_counter() - start
                row = {"model": name, "vertices": model.n_verts, "frames": n_frames, "format": fmt,
                       "correctives": report.correctives, "seconds": round(seconds, 3),
                       "ratio_to_R": round(seconds * 1000 / r_ms, 1),
                       "corrective_max_mm": round(report.corrective_max_mm, 4),
                       "corrective_mean_mm": round(report.corrective_mean_mm, 4)}
                if fmt == "glb":
                    gl = GltfSkinning(out)
                    expect = full if mode == "bake" else rigid
                    err = max(np.linalg.norm(gl.skinned_positions(f) - expect[f], axis=1).max()
                              for f in range(n_frames))
                    row.update(megabytes=round(out.stat().st_size / 1e6, 2), morph_targets=report.morph_targets,
                               round_trip_max_mm=float(f"{err * 1000:.2g}"))
                results.append(row)
    return {"results": results, "R_ms": round(r_ms, 2), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def blender_check(python: str, n_frames: int = 12) -> list[dict]:
    """Import signed and split GLBs of a synthetic track with Blender's glTF importer (run by `python`,
    an interpreter with `bpy`; bench/blender_import.py) and compare its animation with FlameModel's
    vertices (correctives included: they are baked). One row per model and morph mode."""
    import subprocess

    from fitter import export as ex

    script = Path(__file__).with_name("blender_import.py")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, model in _models():
            track = synthetic_track(model, n_frames=n_frames, fps=25.0)
            np.savez(folder / f"{name}.npz", **track)
            np.save(folder / f"{name}_truth.npy", flame_vertices(model, track, list(range(n_frames)), True))
            for morph in ("signed", "split"):
                glb = folder / f"{name}_{morph}.glb"
                ex.export_file(folder / f"{name}.npz", "glb", glb, model=model, morph=morph)
                done = subprocess.run([python, str(script), str(glb), str(folder / f"{name}_truth.npy"), "--fps", "25"],
                                      capture_output=True, text=True, check=True)
                record = json.loads(done.stdout.strip().splitlines()[-1])
                worst = max(f.get("max_mm", float("inf")) for f in record["frames"])
                rows.append({"model": name, "morph": morph, "blender": record["blender"],
                             "shape_keys": record["shape_keys"], "keyframes": len(record["keyframes"]),
                             "max_mm": float(f"{worst:.3g}"),
                             "mean_mm": float(f"{np.mean([f.get('mean_mm', np.inf) for f in record['frames']]):.3g}")})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=48, help="frames of the synthetic track")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--blender", metavar="PYTHON", default=None,
                        help="also import the GLBs with Blender's glTF importer, run by this Python (one with bpy)")
    args = parser.parse_args(argv)
    record = run(args.frames)
    if args.blender:
        record["blender"] = blender_check(args.blender)
    if args.json:
        print(json.dumps(record))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"export of a {args.frames}-frame synthetic track; R = {record['R_ms']} ms, "
                        f"{record['threads']} threads")
    cols = ("model", "format", "correctives", "seconds", "ratio_to_R", "megabytes", "morph_targets",
            "round_trip_max_mm", "corrective_max_mm", "corrective_mean_mm")
    for c in cols:
        table.add_column(c)
    for r in record["results"]:
        table.add_row(*[str(r.get(c, "")) for c in cols])
    console = Console(width=200)
    console.print(table)
    if "blender" in record:
        table = Table(title="Blender's glTF importer: evaluated mesh vs FlameModel, 12 keyframes")
        cols = ("model", "morph", "blender", "shape_keys", "keyframes", "max_mm", "mean_mm")
        for c in cols:
            table.add_column(c)
        for r in record["blender"]:
            table.add_row(*[str(r[c]) for c in cols])
        console.print(table)


if __name__ == "__main__":
    main()
