"""Import a GLB with Blender's own glTF importer and compare its animation with known vertices.

Run with a Python that has Blender as a module (`pip install bpy`, e.g. bpy 4.2 for Python 3.11;
it is not a flamefit dependency): `PY bench/blender_import.py FILE.glb TRUTH.npy [--fps 25]`.
TRUTH.npy: T x V x 3 vertices per keyframe in glTF axes. Prints one JSON object: bones, shape
keys, the keyframes and per keyframe the max / mean distance (mm) between Blender's evaluated
mesh (armature + shape keys, converted back from Blender's z-up axes) and TRUTH. Used by
`python -m bench.export --blender PY`.
"""

import argparse
import json
import os
import sys

import bpy
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("glb")
    parser.add_argument("truth")
    parser.add_argument("--fps", type=int, default=25)
    args = parser.parse_args()
    truth = np.load(args.truth)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.fps = args.fps  # the importer converts keyframe times with the scene's frame rate
    bpy.ops.import_scene.gltf(filepath=args.glb)
    armature = next(o for o in bpy.data.objects if o.type == "ARMATURE")
    obj = next(o for o in bpy.data.objects if o.type == "MESH")
    keys = obj.data.shape_keys.key_blocks if obj.data.shape_keys else []
    frames = sorted({int(round(k.co[0])) for a in bpy.data.actions for fc in a.fcurves for k in fc.keyframe_points})
    errors = []
    for i, frame in enumerate(frames[: len(truth)]):
        scene.frame_set(frame)
        evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
        mesh = evaluated.to_mesh()
        co = np.array([v.co[:] for v in mesh.vertices])
        world = np.array(evaluated.matrix_world)
        evaluated.to_mesh_clear()
        co = co @ world[:3, :3].T + world[:3, 3]
        gltf_axes = np.stack([co[:, 0], co[:, 2], -co[:, 1]], 1)  # Blender z-up -> glTF y-up
        if gltf_axes.shape != truth[i].shape:
            errors.append({"frame": frame, "error": f"{len(co)} vertices in Blender, {truth.shape[1]} expected"})
            continue
        d = np.linalg.norm(gltf_axes - truth[i], axis=1) * 1000
        errors.append({"frame": frame, "max_mm": float(d.max()), "mean_mm": float(d.mean())})
    print(json.dumps({"blender": bpy.app.version_string, "bones": [b.name for b in armature.data.bones],
                      "shape_keys": max(len(keys) - 1, 0), "keyframes": frames, "frames": errors}))
    sys.stdout.flush()
    os._exit(0)  # bpy as a module can crash in its own interpreter teardown; the result is out


if __name__ == "__main__":
    main()
