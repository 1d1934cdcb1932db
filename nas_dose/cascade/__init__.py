"""Coarse-to-fine cascade: a full-resolution stage that refines an upsampled coarse dose.

A network trained on a coarse grid (cheap) cannot score better than its grid's resampling floor
on the source grid, where OpenKBP scores. The second stage (the approach of the OpenKBP winner's
cascaded U-Nets and of nnU-Net's cascade) sees the source-grid CT and contours plus the coarse
dose, upsampled, as an extra channel, and predicts the source-grid dose as that coarse dose plus
a learned correction (`nas_dose.models.refiner.Refiner`). It trains on source-grid patches, drawn with extra weight on
target edges and steep dose, and predicts whole volumes window by window (`windows.refine`).

What the second stage learns from matters: coarse predictions of the coarse model's own
training patients are far better than on new patients (in-sample), so a refiner trained on them
learns to trust its input. By default it learns from the reference dose block-averaged to the
coarse grid and randomly degraded (blurred, scaled, smooth noise), so that it learns both to
restore what resampling lost and to correct a coarse dose from the anatomy; `coarse_input:
predictions` uses coarse predictions from a file instead (out-of-fold ones are the right kind:
train the coarse stage with `data.folds`).
"""
