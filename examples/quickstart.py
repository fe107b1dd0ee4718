"""The README's Python example: teacher maps without a graph, then the student's e²KD objective."""
import torch

from e2kd.explain import build_explainer
from e2kd.losses import E2KDObjective
from e2kd.models import create_model, input_transform

narrow = dict(channels=(16, 32, 64, 128), stem_width=16, output_stride=16)
teacher = create_model("resnet18", 10, output_stride=8).eval()  # 8×8 maps at 64 px (stride 32 gives 2×2)
student = create_model("resnet18", 10, **narrow)
images = torch.rand(8, 3, 64, 64)  # [0, 1] RGB
t_explainer = build_explainer("gradcam", teacher)
t_maps, t_logits = t_explainer(input_transform(teacher)(images))  # teacher's top-1 class, one forward, no graph
objective = E2KDObjective(student, "gradcam", temperature=4.0, lam=1.0)  # cosine at the input size (paper)
total, parts = objective(input_transform(student)(images), t_logits, t_maps)
total.backward()  # reaches the student's parameters through its explanation (double backward)
print({k: round(float(v.detach()), 4) for k, v in parts.items()}, tuple(t_maps.shape), tuple(objective.last_maps.shape))
