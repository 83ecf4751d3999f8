"""The pinhole camera: projection, its weak-perspective limit, OpenCV K/R/t round trips, EXIF focal lengths."""

import numpy as np
import pytest
import torch
from PIL import Image

from fitter import io
from fitter.camera import (camera_init_from_landmarks, crop_intrinsics, default_focal_px, opencv_camera,
                           ortho_project, pinhole_from_ortho, pinhole_project, project, project_opencv,
                           towards_camera, with_focal, zoom_camera)
from fitter.detect import from_crop
from fitter.params import FitParams
from priors.flame import FlameModel
from tests.synthetic import synthetic_assets


def test_pinhole_projects_a_hand_computed_point():
    # f = 4 ndc, s = 8 -> the model origin is D = 0.5 m away; a point 0.1 m nearer sits at depth 0.4
    cam = torch.tensor([[8.0, 0.01, -0.02, 4.0, 0.1, -0.2]])
    pt = torch.tensor([[[0.03, 0.05, 0.1]]])
    out = pinhole_project(pt, cam, res=200)[0, 0]
    ndc_x = 4.0 * (0.03 + 0.01) / 0.4 + 0.1
    ndc_y = 4.0 * (0.05 - 0.02) / 0.4 - 0.2
    torch.testing.assert_close(out, torch.tensor([(ndc_x + 1) * 100, (1 - ndc_y) * 100, 0.4]))


def test_pinhole_tends_to_weak_perspective_for_a_far_camera():
    pts = torch.randn(1, 50, 3) * 0.1
    s, t = 7.5, (0.01, -0.02)
    ortho = ortho_project(pts, torch.tensor([[s, *t]]), 224)[..., :2]
    far = pinhole_project(pts, torch.tensor([[s, *t, s * 1e4, 0.0, 0.0]]), 224)[..., :2]
    torch.testing.assert_close(far, ortho, atol=2e-2, rtol=0)  # 1e4 x farther: perspective well under 0.1 px
    near = pinhole_project(pts, torch.tensor([[s, *t, s * 0.5, 0.0, 0.0]]), 224)[..., :2]
    assert (near - ortho).abs().max() > 5.0  # half a metre away: perspective is visible


def test_towards_camera_points_along_the_viewing_ray():
    """Moving a point towards the camera keeps its pixel and brings it nearer (pinhole); weak
    perspective looks along +z everywhere."""
    cam = torch.tensor([[8.0, 0.01, -0.02, 4.0, 0.1, -0.2]])
    pts = torch.randn(1, 20, 3, generator=torch.Generator().manual_seed(0)) * 0.08
    d = towards_camera(pts, cam)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(1, 20))
    a, b = pinhole_project(pts, cam, 200), pinhole_project(pts + 0.05 * d, cam, 200)
    torch.testing.assert_close(b[..., :2], a[..., :2], atol=1e-3, rtol=0)
    torch.testing.assert_close(a[..., 2] - b[..., 2], 0.05 * d[..., 2])  # depth falls by the step along z
    assert (d[..., 2] > 0.8).all()  # a head half a metre away: every ray runs mostly along +z
    torch.testing.assert_close(towards_camera(pts, cam[:, :3]), torch.tensor([0.0, 0.0, 1.0]).expand(1, 20, 3))


def test_camera_init_recovers_scale_and_translation_around_the_principal_point():
    pts = torch.randn(2, 30, 3) * 0.1
    pts[..., 2] = 0.0  # a plane at the model origin: pinhole and weak perspective agree there exactly
    truth = torch.tensor([[7.0, 0.02, -0.01, 5.0, 0.3, -0.4], [9.0, -0.01, 0.03, 12.0, -0.5, 0.2]])
    target = pinhole_project(pts, truth, 224)[..., :2]
    cam = camera_init_from_landmarks(pts, target, 224, truth[:, 3], truth[:, 4:6])
    torch.testing.assert_close(cam, truth, atol=1e-4, rtol=1e-4)


def test_deca_camera_converts_to_the_same_view():
    pts = torch.randn(1, 20, 3) * 0.1
    pts[..., 2] = 0.0
    ortho = torch.tensor([[7.0, 0.02, -0.01]])
    cam = pinhole_from_ortho(ortho, torch.tensor([6.0]), torch.tensor([[0.2, -0.3]]))
    torch.testing.assert_close(pinhole_project(pts, cam, 224), ortho_project(pts, ortho, 224) * torch.tensor(
        [1.0, 1.0, 0.0]) + torch.tensor([0.0, 0.0, 6.0 / 7.0]), atol=1e-3, rtol=0)


def test_zoom_and_focal_changes_keep_the_view_consistent():
    pts = torch.randn(1, 20, 3) * 0.1
    cam = torch.tensor([[8.0, 0.01, 0.02, 6.0, 0.1, -0.1]])
    a = pinhole_project(pts, cam, 200)[..., :2]
    b = pinhole_project(pts, zoom_camera(cam, 2.0), 200)[..., :2]
    torch.testing.assert_close(b - 100.0, (a - 100.0) / 2.0, atol=1e-4, rtol=0)  # twice the crop, same centre
    moved = with_focal(cam, torch.tensor([12.0]))
    torch.testing.assert_close(moved[:, 3] / moved[:, 0], cam[:, 3] / cam[:, 0])  # same distance


def test_crop_intrinsics_of_a_centred_crop():
    f, px, py = crop_intrinsics(1000.0, [320.0, 240.0, 200.0], (480, 640))
    assert (f, px, py) == (10.0, 0.0, 0.0)
    f, px, py = crop_intrinsics(1000.0, [220.0, 140.0, 200.0], (480, 640))
    assert (px, py) == (1.0, -1.0)  # the photo centre is 100 px right of and below the crop centre


@pytest.mark.parametrize("pinhole", [True, False])
def test_opencv_camera_reprojects_the_fitted_landmarks(pinhole):
    model = FlameModel(synthetic_assets())
    p = FitParams.initial(1, model.n_shape, model.n_exp, model.n_verts)
    p.global_pose[:, 1] = 0.5
    p.exp[:, 0] = 1.0
    res, box, scale = 224, np.array([300.0, 180.0, 260.0]), 0.5
    p.cam = torch.tensor([[7.0, 0.01, -0.02, 5.0, 0.4, -0.7]]) if pinhole else torch.tensor([[7.0, 0.01, -0.02]])
    with torch.no_grad():
        out = model(p.shape, p.exp, p.global_pose, p.neck_pose, p.jaw_pose, p.eye_pose)
        crop_px = project(out.landmarks3d, p.cam, res)[0, :, :2].numpy()
    expected = from_crop(crop_px, box, res) / scale  # original-image pixels, as fit.npz holds them
    K, R, t = opencv_camera(p.cam[0], box, res, scale)
    got = project_opencv(out.landmarks3d[0].numpy().astype(np.float64), K, R, t)
    np.testing.assert_allclose(got, expected, atol=0.05 if not pinhole else 1e-3)
    assert np.allclose(R @ R.T, np.eye(3)) and np.linalg.det(R) == pytest.approx(1.0)
    assert t[2] > 0  # the head is in front of the camera (OpenCV: +z forward)


def _jpeg_with_exif(path, tags: dict, size=(400, 300)):
    img = Image.new("RGB", size, (120, 100, 90))
    exif = Image.Exif()
    sub = exif.get_ifd(0x8769)
    for k, v in tags.items():
        sub[k] = v
    img.save(path, exif=exif)
    return path


def test_exif_35mm_focal_length_is_read(tmp_path):
    path = _jpeg_with_exif(tmp_path / "a.jpg", {41989: 50})
    focal, warning = io.read_focal_px(path, (300, 400))
    assert warning is None
    assert focal == pytest.approx(50 / 43.27 * 500.0)  # the diagonal of 400 x 300 is 500 px


def test_exif_focal_plane_resolution_is_read(tmp_path):
    # 4 mm lens, 250 px per mm on the sensor (unit 4 = mm): 1000 px at the camera's own 400 px width
    path = _jpeg_with_exif(tmp_path / "b.jpg", {37386: (4, 1), 41486: (250, 1), 41488: 4, 0xA002: 800})
    focal, warning = io.read_focal_px(path, (300, 400))
    assert warning is None and focal == pytest.approx(500.0)  # the file is half the camera's 800 px


@pytest.mark.parametrize("tags", [{41989: 0}, {41989: 90000}, {37386: (0, 1)}])
def test_bad_exif_focal_is_ignored_with_a_warning(tmp_path, tags):
    path = _jpeg_with_exif(tmp_path / "c.jpg", tags)
    focal, warning = io.read_focal_px(path, (300, 400))
    assert focal is None and str(path) in warning and "ignored" in warning


def test_no_exif_means_the_default_field_of_view(tmp_path):
    path = tmp_path / "d.png"
    Image.new("RGB", (400, 300)).save(path)
    assert io.read_focal_px(path, (300, 400)) == (None, None)
    assert default_focal_px(300, 400) == pytest.approx(50 / 43.27 * 500.0)
