"""The FLAME layer: pure linear-blend-skinning functions and a module that holds the buffers.

Shapes are written as in smplx: B batch, V vertices, J joints, F faces, K coefficients.
Pose layout (as FLAME): joints 0 root (global), 1 neck, 2 jaw, 3 left eye, 4 right eye.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .assets import FlameAssets

MAX_YAW_DEG = 39  # the dynamic contour table covers -39..39 degrees


# ----------------------------------------------------------------------------- pure maths
def blend_shapes(coeffs: Tensor, dirs: Tensor) -> Tensor:
    """Linear blendshape offsets.

    coeffs B x K, dirs V x 3 x K -> offsets B x V x 3.
    """
    V, C, K = dirs.shape
    return (coeffs @ dirs.reshape(V * C, K).T).view(-1, V, C)  # a matmul: einsum costs an import under autodiff


def k_major(dirs: Tensor) -> Tensor:
    """The same N x 3 x K blendshapes stored coefficient-major (a permuted view of K x N x 3 memory):
    blend_shapes' product then runs along contiguous rows, 3x faster for one image on a CPU."""
    return dirs.permute(2, 0, 1).contiguous().permute(1, 2, 0)


def vertices2joints(J_regressor: Tensor, vertices: Tensor) -> Tensor:
    """Joint locations regressed from vertices: J_regressor J x V, vertices B x V x 3 -> B x J x 3."""
    return J_regressor @ vertices


def batch_rodrigues(rot_vecs: Tensor, eps: float = 1e-8) -> Tensor:
    """Axis-angle N x 3 -> rotation matrices N x 3 x 3 (smooth at zero)."""
    angle = torch.sqrt((rot_vecs * rot_vecs).sum(dim=1, keepdim=True) + eps)  # N x 1
    axis = rot_vecs / angle
    cos = torch.cos(angle)[:, :, None]
    sin = torch.sin(angle)[:, :, None]
    x, y, z = axis[:, 0], axis[:, 1], axis[:, 2]
    zeros = torch.zeros_like(x)
    K = torch.stack([zeros, -z, y, z, zeros, -x, -y, x, zeros], dim=1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=rot_vecs.dtype, device=rot_vecs.device)[None]
    return eye + sin * K + (1 - cos) * torch.bmm(K, K)


def rot_mat_to_yaw(R: Tensor) -> Tensor:
    """Rotation about +y (radians) of rotation matrices N x 3 x 3, as DECA's rot_mat_to_euler."""
    sy = torch.sqrt(R[:, 0, 0] ** 2 + R[:, 1, 0] ** 2)
    return torch.atan2(-R[:, 2, 0], sy)


def batch_rigid_transform(rot_mats: Tensor, joints: Tensor, parents: Tensor) -> tuple[Tensor, Tensor]:
    """Forward kinematics.

    rot_mats B x J x 3 x 3 (local rotations), joints B x J x 3 (rest positions), parents J
    (parents[0] = -1) -> posed joints B x J x 3 and relative transforms B x J x 4 x 4 that map
    rest-pose points to posed points.
    """
    B, J = joints.shape[:2]
    # no tensor indexing or in-place writes here: the least-squares Jacobian differentiates this twice
    # under torch's vmap, which runs such ops one Jacobian column at a time (fitter.optimize)
    rel = torch.stack([joints[:, 0]] + [joints[:, j] - joints[:, int(parents[j])] for j in range(1, J)], dim=1)
    local = torch.cat([rot_mats, rel[..., None]], dim=-1)  # B x J x 3 x 4
    bottom = torch.tensor([0, 0, 0, 1], dtype=joints.dtype, device=joints.device).expand(B, J, 1, 4)
    local = torch.cat([local, bottom], dim=-2)  # B x J x 4 x 4
    chain = [local[:, 0]]
    for j in range(1, J):
        chain.append(chain[int(parents[j])] @ local[:, j])
    world = torch.stack(chain, dim=1)  # B x J x 4 x 4
    posed_joints = world[:, :, :3, 3]
    # subtract the transformed rest joint so the transform applies to rest-pose vertices
    offset = (world[:, :, :3, :3] @ joints[..., None])[..., 0]
    top = torch.cat([world[:, :, :3, :3], (posed_joints - offset)[..., None]], dim=-1)
    return posed_joints, torch.cat([top, bottom], dim=-2)


def lbs_transforms(coeffs: Tensor, pose: Tensor, v_template: Tensor, dirs: Tensor, J_regressor: Tensor,
                   parents: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The shaped rest pose and the joint transforms of linear blend skinning.

    coeffs B x K, pose B x (J*3) axis-angle, v_template V x 3, dirs V x 3 x K, J_regressor J x V,
    parents J -> v_shaped B x V x 3, pose_feature B x 9(J-1) (the correctives' input), transforms
    A B x J x 4 x 4 (rest-pose points to posed points) and posed joints B x J x 3.
    """
    v_shaped = v_template[None] + blend_shapes(coeffs, dirs)
    joints = vertices2joints(J_regressor, v_shaped)
    return (v_shaped, *pose_transforms(pose, joints, parents))


def pose_transforms(pose: Tensor, joints: Tensor, parents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """pose B x (J*3) axis-angle, rest joints B x J x 3, parents J -> pose_feature B x 9(J-1) (the
    correctives' input), transforms A B x J x 4 x 4 (rest-pose points to posed points) and posed
    joints B x J x 3."""
    B = pose.shape[0]
    rot_mats = batch_rodrigues(pose.reshape(-1, 3)).view(B, -1, 3, 3)
    eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
    pose_feature = (rot_mats[:, 1:] - eye).reshape(B, -1)
    posed_joints, A = batch_rigid_transform(rot_mats, joints, parents)
    return pose_feature, A, posed_joints


def skin(v_shaped: Tensor, pose_feature: Tensor, A: Tensor, posedirs: Tensor | None, weights: Tensor) -> Tensor:
    """Pose correctives and skinning: v_shaped B x N x 3, pose_feature B x P, A B x J x 4 x 4,
    posedirs P x (N*3) or None (no correctives), weights N x J -> posed points B x N x 3."""
    B = v_shaped.shape[0]
    v_posed = v_shaped if posedirs is None else v_shaped + (pose_feature @ posedirs).view(B, -1, 3)
    T = (weights @ A[:, :, :3].reshape(B, -1, 12)).view(B, -1, 3, 4)  # B x N x 3 x 4
    # elementwise: no N tiny 3 x 3 matmuls
    return (T[..., :3] * v_posed[:, :, None]).sum(-1) + T[..., 3]


def lbs(
    coeffs: Tensor,
    pose: Tensor,
    v_template: Tensor,
    dirs: Tensor,
    posedirs: Tensor | None,
    J_regressor: Tensor,
    parents: Tensor,
    weights: Tensor,
) -> tuple[Tensor, Tensor]:
    """Linear blend skinning with blendshapes and pose correctives.

    coeffs B x K (shape and expression concatenated), pose B x (J*3) axis-angle,
    v_template V x 3, dirs V x 3 x K, posedirs P x (V*3) with P = 9 * (J - 1) (None: no pose
    correctives), J_regressor J x V, parents J, weights V x J -> vertices B x V x 3, joints B x J x 3.
    """
    v_shaped, pose_feature, A, posed_joints = lbs_transforms(coeffs, pose, v_template, dirs, J_regressor, parents)
    return skin(v_shaped, pose_feature, A, posedirs, weights), posed_joints


def vertices2landmarks(vertices: Tensor, faces: Tensor, lmk_faces: Tensor, lmk_bary: Tensor) -> Tensor:
    """Barycentric landmarks: vertices B x V x 3, faces F x 3, lmk_faces B x L, lmk_bary B x L x 3 -> B x L x 3."""
    B, L = lmk_faces.shape
    tri = faces[lmk_faces]  # B x L x 3 vertex ids
    batch = torch.arange(B, device=vertices.device)[:, None, None]
    corners = vertices[batch, tri]  # B x L x 3 x 3
    return (corners * lmk_bary[..., None]).sum(dim=2)


def dynamic_contour_rows(yaw_deg: Tensor) -> Tensor:
    """Row of the dynamic contour table for head yaw in degrees (B,) -> (B,) long.

    Row r stands for a = r (0..39) and a = 39 - r (r = 40..78, i.e. -1..-39 degrees).
    """
    a = torch.round(yaw_deg).clamp(-MAX_YAW_DEG, MAX_YAW_DEG).long()
    return torch.where(a >= 0, a, MAX_YAW_DEG - a)


# ----------------------------------------------------------------------------- the module
@dataclass
class FlameOutput:
    vertices: Tensor  # B x V x 3, metres, model space
    joints: Tensor  # B x J x 3
    landmarks3d: Tensor  # B x 68 x 3, with the dynamic jaw contour
    landmarks3d_full: Tensor  # B x 68 x 3, fixed (frontal) contour
    dense: Tensor | None = None  # B x N x 3, the attached dense embedding's points (attach_dense)


@dataclass
class VertexSubset:
    """The model's per-vertex buffers for some of its vertices (FlameModel.vertex_subset): evaluating
    only these rows gives exactly those vertices of the full evaluation."""

    ids: Tensor | None  # N, indices into the model's vertices (None: all of them)
    template: Tensor  # N x 3
    dirs: Tensor  # N x 3 x K, stored coefficient-major (k_major)
    posedirs: Tensor  # P x (N*3)
    weights: Tensor  # N x J


class FlameModel(nn.Module):
    """Holds a FLAME-format model as buffers and evaluates it; the maths lives in the functions above."""

    def __init__(self, assets: FlameAssets, n_shape: int | None = None, n_exp: int | None = None):
        super().__init__()
        n_shape = assets.n_shape if n_shape is None else min(n_shape, assets.n_shape)
        n_exp = assets.n_exp if n_exp is None else min(n_exp, assets.n_exp)
        self.n_shape, self.n_exp = n_shape, n_exp
        self.name, self.tag = assets.name, assets.tag
        f32 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))
        dirs = np.concatenate([assets.shapedirs[:, :, :n_shape], assets.expdirs[:, :, :n_exp]], axis=2)
        P = assets.posedirs.shape[2]
        self.register_buffer("v_template", f32(assets.v_template))
        self.register_buffer("dirs", k_major(f32(dirs)))
        self.register_buffer("posedirs", f32(assets.posedirs.reshape(-1, P).T.copy()))
        self.has_correctives = bool(np.any(assets.posedirs))  # all zero (e.g. the stand-in): skipped
        self.register_buffer("J_regressor", f32(assets.J_regressor))
        self.register_buffer("weights", f32(assets.weights))
        self.register_buffer("parents", torch.as_tensor(assets.parents, dtype=torch.long))
        self.register_buffer("faces", torch.as_tensor(assets.faces, dtype=torch.long))
        lm = assets.landmarks
        self.has_landmarks = lm is not None
        if lm is not None:
            long = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))
            self.register_buffer("static_faces", long(lm.static_faces))
            self.register_buffer("static_bary", f32(lm.static_bary))
            self.register_buffer("dynamic_faces", long(lm.dynamic_faces))
            self.register_buffer("dynamic_bary", f32(lm.dynamic_bary))
            self.register_buffer("full_faces", long(lm.full_faces).reshape(-1))
            self.register_buffer("full_bary", f32(lm.full_bary).reshape(-1, 3))
            self._init_landmark_points()
        # the rest joints are linear in the coefficients: joint blendshapes, exact and tiny
        V, _, K = self.dirs.shape
        self.register_buffer("joint_template", self.J_regressor @ self.v_template)
        self.register_buffer("joint_dirs", (self.J_regressor @ self.dirs.reshape(V, -1)).view(-1, 3, K))
        self.has_dense = False

    def _surface_points(self, faces: Tensor, bary: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Points on the surface (a triangle and barycentric weights each, N and N x 3) as points of
        their own: template N x 3, blendshapes N x 3 x K, pose correctives P x (N*3) and skinning
        weights N x J, each their corners' interpolated with the barycentric weights."""
        corners = self.faces[faces]  # N x 3

        def blend(t: Tensor) -> Tensor:  # V x ... -> N x ...
            return (t[corners] * bary.view(*bary.shape, *([1] * (t.dim() - 1)))).sum(1)

        P = self.posedirs.shape[0]
        return (blend(self.v_template), blend(self.dirs),
                blend(self.posedirs.view(P, -1, 3).transpose(0, 1)).transpose(0, 1).reshape(P, -1),
                blend(self.weights))

    def _init_landmark_points(self) -> None:
        """The 68 landmarks are skinned as surface points of their own (see attach_dense), every
        candidate at once: the 51 static points, the 68 with the fixed contour, and the dynamic
        contour's rows x 17. A landmark-only (lean) evaluation then skins the 119 fixed points and 17
        per contour row in use, and no vertex."""
        R, C = self.dynamic_faces.shape
        faces = torch.cat([self.static_faces, self.full_faces, self.dynamic_faces.reshape(-1)])
        bary = torch.cat([self.static_bary, self.full_bary, self.dynamic_bary.reshape(-1, 3)])
        template, dirs, posedirs, weights = self._surface_points(faces, bary)
        self.register_buffer("lmk_template", template)
        self.register_buffer("lmk_dirs", dirs)
        self.register_buffer("lmk_posedirs", posedirs.view(posedirs.shape[0], -1, 3).contiguous())  # P x N x 3
        self.register_buffer("lmk_weights", weights)
        n_static, n_full = self.static_faces.shape[0], self.full_faces.shape[0]
        ids = torch.arange(len(faces), device=faces.device)
        self.register_buffer("lmk_static_ids", ids[:n_static])
        self.register_buffer("lmk_full_ids", ids[n_static:n_static + n_full])
        self.register_buffer("lmk_dynamic_ids", ids[n_static + n_full:].view(R, C))

    def place_static_landmarks(self, faces: np.ndarray, bary: np.ndarray) -> None:
        """Move the 51 static landmarks (17..67 of the 68: brows, nose, eyes, mouth) to other surface points
        (a triangle and barycentric weights each, 51 and 51 x 3), in the static and the fixed-contour set
        alike; the contour's candidates stay."""
        dev = self.faces.device
        self.static_faces = torch.as_tensor(np.asarray(faces, np.int64), device=dev)
        self.static_bary = torch.as_tensor(np.asarray(bary, np.float32), device=dev)
        n = self.static_faces.shape[0]
        self.full_faces = torch.cat([self.full_faces[:-n], self.static_faces])
        self.full_bary = torch.cat([self.full_bary[:-n], self.static_bary])
        self._init_landmark_points()

    def attach_dense(self, faces: np.ndarray, bary: np.ndarray) -> None:
        """Evaluate a dense landmark embedding (a triangle and barycentric weights per point, N and
        N x 3) with every forward pass, lean ones included: FlameOutput.dense is then B x N x 3.

        Each point is skinned as a surface point of its own: its template position, blendshapes,
        pose correctives and skinning weights are its corners' interpolated with its barycentric
        weights, then posed like a vertex. That is exactly the posed corners interpolated wherever
        the corners share their skinning weights, and differs only at second order (the weights'
        change across one triangle times its size times the joints' relative rotation) where they
        do not; one row per point instead of three vertices keeps the landmark stages' Jacobians
        small."""
        dev = self.faces.device
        f = torch.as_tensor(np.asarray(faces, np.int64), device=dev)
        b = torch.as_tensor(np.asarray(bary, np.float32), device=dev)
        template, dirs, posedirs, weights = self._surface_points(f, b)
        self.register_buffer("dense_faces", f)
        self.register_buffer("dense_bary", b)
        self.register_buffer("dense_template", template)
        self.register_buffer("dense_dirs", dirs)
        self.register_buffer("dense_posedirs", posedirs.contiguous())
        self.register_buffer("dense_weights", weights)
        self.has_dense = True

    def vertex_subset(self, ids: Tensor) -> VertexSubset:
        """The buffers of vertices `ids` (N), copied once so that evaluating them reads N rows only."""
        ids = ids.to(device=self.v_template.device, dtype=torch.long)
        P = self.posedirs.shape[0]
        return VertexSubset(ids, self.v_template[ids], k_major(self.dirs[ids]),
                            self.posedirs.view(P, -1, 3)[:, ids].reshape(P, -1), self.weights[ids])

    @property
    def n_verts(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def n_joints(self) -> int:
        return int(self.parents.shape[0])

    def full_pose(self, global_pose: Tensor, neck_pose: Tensor, jaw_pose: Tensor, eye_pose: Tensor) -> Tensor:
        """B x 3, B x 3, B x 3, B x 6 -> B x 15 in joint order."""
        return torch.cat([global_pose, neck_pose, jaw_pose, eye_pose], dim=1)

    def landmarks(self, coeffs: Tensor, pose_feature: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        """68 landmarks (dynamic contour) and the 68 with the fixed contour, B x 68 x 3 each, skinned
        as surface points (coefficients B x K, and pose_transforms' pose_feature and A).
        One set of points for the whole batch (the static and fixed ones, and the contour rows that
        some image needs), so the blendshape product is one matmul, not one per image. The contour
        row follows the yaw of root . neck (degrees, +towards +x): the rotation of the neck joint's
        transform in A."""
        B = coeffs.shape[0]
        rows = self._contour_rows(A)
        used, which = torch.unique(rows, return_inverse=True)  # U rows, each image's among them
        n_fixed = self.lmk_static_ids.shape[0] + self.lmk_full_ids.shape[0]
        ids = torch.cat([self.lmk_static_ids, self.lmk_full_ids, self.lmk_dynamic_ids[used].reshape(-1)])
        shaped = self.lmk_template[ids][None] + blend_shapes(coeffs, self.lmk_dirs[ids])
        posedirs = self.lmk_posedirs[:, ids].reshape(pose_feature.shape[1], -1) if self.has_correctives else None
        points = skin(shaped, pose_feature, A, posedirs, self.lmk_weights[ids])  # B x N x 3
        n_static = self.lmk_static_ids.shape[0]
        # each image's row picked by a product, not an index (see batch_rigid_transform)
        pick = torch.nn.functional.one_hot(which, len(used)).to(points.dtype)[:, None]  # B x 1 x U
        contour = (pick @ points[:, n_fixed:].reshape(B, len(used), -1)).view(B, -1, 3)
        return torch.cat([contour, points[:, :n_static]], dim=1), points[:, n_static:n_fixed]

    def _contour_rows(self, A: Tensor) -> Tensor:
        """Each image's row of the dynamic contour (B,), from the yaw of root . neck in the transforms A."""
        return dynamic_contour_rows(torch.rad2deg(rot_mat_to_yaw(A[:, 1, :3, :3].detach())))

    def lean_coeff_jacobian(self, coeffs: Tensor, pose: Tensor) -> Tensor:
        """The derivative of a lean evaluation's points in the coefficients: coeffs B x K (shape and
        expression), pose B x (J*3) -> B x N x 3 x K, the points in the order landmarks3d (68),
        landmarks3d_full (68), dense (if attached).

        Exact, with no autodiff: at a fixed pose every point is linear in the coefficients. Its rest
        position moves by its blendshapes, skinned with its weighted joint rotations; and the rest
        joints move by the joint blendshapes, which the kinematic chain carries through the same
        rotations into each joint transform's translation (linear in the rest joints). The
        correctives depend on the pose alone."""
        B, K = coeffs.shape
        J = self.n_joints
        joints = self.joint_template[None] + blend_shapes(coeffs, self.joint_dirs)
        _, A, _ = pose_transforms(pose, joints, self.parents)
        rot = batch_rodrigues(pose.reshape(-1, 3)).view(B, 1, J, 3, 3).expand(B, K, J, 3, 3).reshape(-1, J, 3, 3)
        jdirs = self.joint_dirs.permute(2, 0, 1)[None].expand(B, K, J, 3).reshape(-1, J, 3)
        shift = batch_rigid_transform(rot, jdirs, self.parents)[1][:, :, :3, 3]  # (B K) x J x 3
        shift = shift.view(B, K, J, 3).transpose(1, 2).reshape(B, J, K * 3)
        rotation = A[:, :, :3, :3].reshape(B, J, 9)

        def points(dirs: Tensor, weights: Tensor) -> Tensor:  # (B x) N x 3 x K, (B x) N x J -> B x N x 3 x K
            turn = (weights @ rotation).view(B, -1, 3, 3)  # each point's blended rotation
            moved = (weights @ shift).view(B, -1, K, 3).transpose(2, 3)  # its blended joint translations
            return turn @ dirs + moved

        parts = []
        if self.has_landmarks:  # per image: its contour row, the static points, the fixed contour's
            ids = torch.cat([self.lmk_dynamic_ids[self._contour_rows(A)],
                             self.lmk_static_ids.expand(B, -1), self.lmk_full_ids.expand(B, -1)], dim=1)
            parts.append(points(self.lmk_dirs[ids], self.lmk_weights[ids]))
        if self.has_dense:
            parts.append(points(self.dense_dirs, self.dense_weights))
        return torch.cat(parts, dim=1)

    def forward(
        self,
        shape: Tensor,
        exp: Tensor,
        global_pose: Tensor,
        neck_pose: Tensor,
        jaw_pose: Tensor,
        eye_pose: Tensor,
        transl: Tensor | None = None,
        lean: bool = False,
        subset: VertexSubset | None = None,
    ) -> FlameOutput:
        """shape B x n_shape, exp B x n_exp, poses B x 3 (eye B x 6), transl B x 3 -> FlameOutput.

        Joints come from joint blendshapes (the regressor applied to template and blendshapes once);
        landmarks and dense points are skinned as surface points of their own (_surface_points).
        lean: no vertices (FlameOutput.vertices is B x 0 x 3): the landmark stages need only the
        joints, landmarks and dense points, which equal the full evaluation's.
        subset: evaluate only those vertices (FlameOutput.vertices is B x N x 3, in subset.ids order);
        joints, landmarks and dense points are the full evaluation's.
        """
        pose = self.full_pose(global_pose, neck_pose, jaw_pose, eye_pose)
        coeffs = torch.cat([shape, exp], dim=1)
        joints = self.joint_template[None] + blend_shapes(coeffs, self.joint_dirs)
        pose_feature, A, joints = pose_transforms(pose, joints, self.parents)
        correctives = self.has_correctives
        if lean and self.has_landmarks:
            verts = coeffs.new_zeros(coeffs.shape[0], 0, 3)
        else:
            rows = subset or VertexSubset(None, self.v_template, self.dirs, self.posedirs, self.weights)
            v_shaped = rows.template[None] + blend_shapes(coeffs, rows.dirs)
            verts = skin(v_shaped, pose_feature, A, rows.posedirs if correctives else None, rows.weights)
        if transl is not None:
            verts = verts + transl[:, None]
            joints = joints + transl[:, None]
        if self.has_landmarks:
            lmk, full = self.landmarks(coeffs, pose_feature, A)
            if transl is not None:
                lmk, full = lmk + transl[:, None], full + transl[:, None]
        else:
            lmk = full = verts.new_zeros(verts.shape[0], 68, 3)
        dense = None
        if self.has_dense:  # surface points skinned on their own (attach_dense)
            shaped = self.dense_template[None] + blend_shapes(coeffs, self.dense_dirs)
            dense = skin(shaped, pose_feature, A, self.dense_posedirs if correctives else None, self.dense_weights)
            if transl is not None:
                dense = dense + transl[:, None]
        return FlameOutput(verts, joints, lmk, full, dense)
