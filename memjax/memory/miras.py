"""ATLAS (arXiv 2505.23735), the Miras models (arXiv 2504.13173) and DeepTransformers / Dot as
configurations of the one neural-memory block (memjax.memory.titans.NeuralMemoryBlock).

Each name registers the block with its paper's defaults; every setting stays a config value
(`config.model.<name>.*`), so e.g. `--config.model.atlas.hybrid=mag` is Atlas as the memory branch of a
memory-as-gate hybrid with sliding-window attention, and `--config.model.atlas.memory=gated` is Atlas++.

| name            | memory                 | objective          | optimizer          | retention | phi          |
|-----------------|------------------------|--------------------|--------------------|-----------|--------------|
| atlas           | x + W1 s(W2 x)         | Omega, c = 4       | muon (NS, 5 steps) | decay     | poly, p = 2  |
| omeganet        | x + W1 s(W2 x)         | Omega, c = 4       | momentum           | decay     | poly, p = 2  |
| moneta          | x + LN(W1 s(W2 x))     | l_p, p = 3         | gd                 | qnorm, q=4| identity     |
| yaad            | x + LN(W1 s(W2 x))     | Huber, delta_t     | gd                 | decay     | identity     |
| memora          | x + LN(W1 s(W2 x))     | l2                 | gd                 | softmax   | identity     |
| deeptransformer | W1 s(W2 x)             | dot (Hebbian)      | gd                 | decay     | exp, p = 2   |
| dot             | W1 s(W2 x)             | l2 Omega, c = 4    | gd                 | decay     | exp, p = 2   |

"exp, p = 2": the polynomial map with fixed coefficients 1/sqrt(i!), i.e. the exponential kernel
truncated at degree 2 (with a linear memory and the Hebbian rule this is unnormalised softmax attention
with that kernel; see the tests).
"""

from __future__ import annotations

from memjax.memory.titans import register_memory_block

ATLAS_MEMORY = {"memory": "mlp", "memory_depth": 2, "memory_residual": "add"}
MIRAS_MEMORY = {"memory": "mlp", "memory_depth": 2, "memory_residual": "norm"}
EXP_FEATURES = {"feature_degree": 2, "feature_learnable": False}

Atlas = register_memory_block("atlas", **ATLAS_MEMORY, omega_window=4, optimizer="muon", feature_degree=2)
OmegaNet = register_memory_block("omeganet", **ATLAS_MEMORY, omega_window=4, optimizer="momentum", feature_degree=2)
Moneta = register_memory_block("moneta", **MIRAS_MEMORY, objective="lp", p_norm=3.0, optimizer="gd",
                               retention="qnorm", q_norm=4.0)
Yaad = register_memory_block("yaad", **MIRAS_MEMORY, objective="huber", optimizer="gd")
Memora = register_memory_block("memora", **MIRAS_MEMORY, optimizer="gd", retention="softmax")
DeepTransformer = register_memory_block("deeptransformer", objective="dot", optimizer="gd", **EXP_FEATURES)
Dot = register_memory_block("dot", omega_window=4, optimizer="gd", **EXP_FEATURES)
