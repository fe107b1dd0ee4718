"""The README's Python example: teacher maps without a graph, a differentiable student map, the e²KD loss."""
import torch

from e2kd.explain import build_explainer
from e2kd.losses import E2KDLoss
from e2kd.models import create_model, input_transform

narrow = dict(channels=(16, 32, 64, 128), stem_width=16, output_stride=16)
teacher, student = create_model("resnet18", 10).eval(), create_model("resnet18", 10, **narrow)
images = torch.rand(8, 3, 64, 64)  # [0, 1] RGB
t_explainer = build_explainer("gradcam", teacher)
t_maps = t_explainer(input_transform(teacher)(images))  # teacher's top-1 class, one forward, no graph
s_explainer = build_explainer("gradcam", student)
s_maps = s_explainer(input_transform(student)(images), t_explainer.last_logits.argmax(1), create_graph=True)
total, parts = E2KDLoss(temperature=4.0, lam=1.0)(s_explainer.last_logits, t_explainer.last_logits, s_maps, t_maps)
total.backward()  # reaches the student's parameters through its explanation (double backward)
print({k: round(float(v), 4) for k, v in parts.items()}, tuple(t_maps.shape), tuple(s_maps.shape))
