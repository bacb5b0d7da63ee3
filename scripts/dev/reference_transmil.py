"""Load the authors' TransMIL code (https://github.com/szc19990412/TransMIL checkout at PATH) on a
CPU machine with a current PyTorch, for the parity fixture and the training-step benchmark:

- models/__init__.py pulls in the Lightning training wrapper, so models/TransMIL.py is loaded alone;
- the reference moves its cls token to CUDA (`.cuda()`), made a no-op;
- nystrom-attention 0.0.9 (what the reference pins) scales q in place on a view from chunk(), which
  autograd refuses since PyTorch 1.8; chunk() is made to return copies (same values, same gradients).

Returns (the TransMIL module, MyOptimizer.optim_factory.create_optimizer)."""
import importlib.util
import sys

import torch


def load(path):
    sys.path.insert(0, path)
    torch.Tensor.cuda = lambda self, *a, **k: self
    chunk = torch.Tensor.chunk
    torch.Tensor.chunk = lambda self, *a, **k: tuple(t.clone() for t in chunk(self, *a, **k))
    spec = importlib.util.spec_from_file_location("ref_transmil", f"{path}/models/TransMIL.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    from MyOptimizer.optim_factory import create_optimizer

    return ref, create_optimizer


def paper_optimizer(create_optimizer, model):
    """Lookahead(RAdam), lr 2e-4, weight decay 1e-5: the reference's Camelyon/TransMIL.yaml."""
    import types

    args = types.SimpleNamespace(opt="lookahead_radam", lr=2e-4, weight_decay=1e-5, opt_eps=None, opt_betas=None,
                                 momentum=None)
    return create_optimizer(args, model)
