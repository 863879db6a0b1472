// Shared by benches/bgmv.rs and benches/sgmv.rs (included with `include!`): a Llama-shaped
// multi-adapter layer and the minimum bytes a launch must move.
#[allow(dead_code, clippy::type_complexity)]
mod serving_common {
    use lora_kernels::adapter::{AdapterTable, AdapterTableBuilder, LoraWeights, Slice};
    use lora_kernels::{f16, Backend, DType};

    pub struct Layer<B: Backend> {
        pub d_in: usize,
        pub slices: Vec<Slice>,
        pub rank: usize,
        pub n_adapters: usize,
        pub weights: Vec<Vec<(B::Buffer<f16>, B::Buffer<f16>)>>,
    }

    /// `n_adapters` adapters of rank `rank` on a layer `d_in → widths` (f16 weights).
    pub fn layer<B: Backend>(
        b: &B,
        d_in: usize,
        widths: &[usize],
        rank: usize,
        n_adapters: usize,
    ) -> Layer<B> {
        let mut off = 0;
        let slices: Vec<Slice> = widths
            .iter()
            .map(|&n| {
                let s = Slice { n, offset: off };
                off += n;
                s
            })
            .collect();
        let weights = (0..n_adapters)
            .map(|i| {
                slices
                    .iter()
                    .map(|s| {
                        let v = f16::from_f32(0.001 * (i % 7) as f32);
                        (
                            b.upload(&vec![v; rank * d_in]).unwrap(),
                            b.upload(&vec![v; s.n * rank]).unwrap(),
                        )
                    })
                    .collect()
            })
            .collect();
        Layer {
            d_in,
            slices,
            rank,
            n_adapters,
            weights,
        }
    }

    impl<B: Backend> Layer<B> {
        pub fn table(&self, b: &B) -> AdapterTable<'_, B> {
            let mut t =
                AdapterTableBuilder::new(self.n_adapters, self.d_in, &self.slices, DType::F16)
                    .unwrap();
            for (a, per) in self.weights.iter().enumerate() {
                for (s, (wa, wb)) in per.iter().enumerate() {
                    t.set(
                        b,
                        a,
                        s,
                        wa,
                        wb,
                        LoraWeights::packed(self.rank, 2.0, self.d_in),
                    )
                    .unwrap();
                }
            }
            t.build(b).unwrap()
        }
        pub fn out_width(&self) -> usize {
            self.slices.iter().map(|s| s.n).sum()
        }
        /// Minimum bytes: the distinct adapters' A (shrink) or B (expand) once, plus activations.
        pub fn bytes(&self, tokens: usize, distinct: usize, shrink: bool) -> u64 {
            let w: usize = if shrink {
                self.slices.len() * self.rank * self.d_in
            } else {
                self.out_width() * self.rank
            };
            let act = if shrink {
                tokens * self.d_in * 2 + self.slices.len() * tokens * self.rank * 4
            } else {
                self.slices.len() * tokens * self.rank * 4 + 2 * tokens * self.out_width() * 2
            };
            (distinct * w * 2 + act) as u64
        }
    }

    /// Whether to run the host backends (the GPU kit sets LK_BENCH_ONLY_CUDA=1).
    pub fn host_backends() -> bool {
        std::env::var("LK_BENCH_ONLY_CUDA").map_or(true, |v| v != "1")
    }
}
