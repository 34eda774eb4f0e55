"""Confirming an alarm on the PyTorch twin with VGatt (thesis 002, section 4.3): is the evidence for the flipped
pixels' new class concentrated in a small window, as a patch's would be, or spread over the scene?

VGatt decomposes the twin's score of the alarm's new class over the flipped region into per-pixel input
contributions. Two readings of "concentrated in a small window": the share of the positive evidence on what just
appeared (the alarm's trigger, where a patch would be) against the share of the image it covers, and the share the
densest `window` x `window` box holds. A patch-driven flip draws far more evidence from the patch than its area."""

from __future__ import annotations

import cv2
import numpy as np
import torch


class VGattConfirmer:
    def __init__(self, twin, window: int = 16, concentrated: float = 0.3, density: float = 4.0):
        from audit.vgatt import VGatt

        self.twin, self.window, self.concentrated, self.density = twin, window, concentrated, density
        self.vgatt = VGatt(twin.model.eval())

    def __call__(self, rgb: np.ndarray, region: np.ndarray, to_class: int, trigger: np.ndarray | None = None) -> dict:
        device = next(self.twin.model.parameters()).device  # the twin's, chosen by whoever loaded it
        image = torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 255.0).to(device)
        result = self.vgatt.attribute(self.twin.spec.normalization.normalize(image[None]), to_class, region)
        positive = np.clip(result.map, 0, None)
        total = float(positive.sum())
        if total <= 0:
            return {"window_share": float("nan"), "concentrated": False,
                    "completeness_error": float(result.completeness_error_vs_contributions),
                    "completeness_error_vs_score": float(result.completeness_error), "exact": bool(result.exact)}
        size = min(self.window, *positive.shape)
        # sum of positive evidence in every size x size box, anchored at its top-left corner
        boxes = cv2.boxFilter(positive.astype(np.float64), -1, (size, size), normalize=False, anchor=(0, 0),
                              borderType=cv2.BORDER_CONSTANT)[: positive.shape[0] - size + 1, : positive.shape[1] - size + 1]
        top, left = np.unravel_index(int(boxes.argmax()), boxes.shape)
        share = float(boxes[top, left] / total)
        evidence = {"window": [int(top), int(left), int(top + size), int(left + size)], "window_share": round(share, 4),
                    "window_area_share": round(size * size / positive.size, 4),
                    "completeness_error": float(result.completeness_error_vs_contributions),
                    "completeness_error_vs_score": float(result.completeness_error), "exact": bool(result.exact)}
        if trigger is not None and trigger.any():
            on_trigger = float(positive[trigger].sum() / total)
            area = float(trigger.mean())
            evidence.update(trigger_share=round(on_trigger, 4), trigger_area_share=round(area, 4),
                            trigger_density=round(on_trigger / area, 2))
        evidence["concentrated"] = evidence.get("trigger_density", 0.0) >= self.density or share >= self.concentrated
        return evidence
