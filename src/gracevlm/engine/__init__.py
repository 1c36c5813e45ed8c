"""Generation: prompt -> tokens -> prefill -> decode loop, sampling, streaming, timings."""
