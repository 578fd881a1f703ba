"""One jit-compiled decoding loop and the samplers that drive it (DESIGN.md, "The decoding
loop"): plain greedy/temperature/top-k/top-p sampling, and speculative decoding after
Leviathan et al. (arXiv 2211.17192) and Chen et al. (arXiv 2302.01318), prompt lookup,
FLy (arXiv 2511.22972) and Kangaroo-style self-speculation (arXiv 2404.18911).

    from decoding.generate import generate
    out = generate(model, [[1, 2, 3]], sampler="speculative_greedy", draft_model=draft,
                   max_new_tokens=64)
    out.tokens, out.stats

    loop.py         LoopState, Stats, run(): the single lax.while_loop
    sampling.py     token pickers and the plain autoregressive sampler
    speculative/    draft/verify rules and the speculative samplers
    generate.py     the public entry point and the sampler names

The package does not re-export `generate`, so that `decoding.generate` stays the module.
"""
