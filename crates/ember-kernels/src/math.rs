//! Elementwise functions written so that the compiler vectorises them: no calls into `libm`,
//! only multiplies, adds, a division, min / max and integer bit tricks.
//!
//! Each kernel loop is declared with [`simd_fn!`], which compiles it three times, for the
//! baseline target, with AVX2 + FMA and with AVX-512, and picks the widest the CPU has at run
//! time, without asking users for `-C target-cpu`. These machines differ: some expose AVX-512,
//! others only AVX2 + FMA.

/// Declares `fn name(args) -> ret { body }` whose body is compiled twice more, with AVX2 and
/// FMA enabled (`fast`) and with AVX-512 as well (`widest`: 16 lanes per vector instead of 8),
/// and called the widest way the CPU supports. The body is an `#[inline(always)]` function so
/// that it (and the `#[inline(always)]` helpers it calls) is generated inside each
/// `#[target_feature]` wrapper; a closure would stay a separate baseline-compiled function.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                fn widest($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn fast($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if $crate::math::has_avx512() {
                    // SAFETY: the CPU supports the features `widest` is compiled for.
                    return unsafe { widest($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `fast` is compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Whether the [`simd_fn!`] kernels run their AVX-512 build: the CPU has AVX-512 F, BW and VL
/// (with AVX2 and FMA) and `EMBER_NO_AVX512` is not set (tests force the AVX2 build with it).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    #[cfg(test)]
    if tests::NARROW.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    *HAS.get_or_init(|| {
        std::env::var_os("EMBER_NO_AVX512").is_none()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    })
}

/// Lanes used for reductions: eight independent partial sums, which the compiler keeps in one
/// vector register (a single running sum would serialise on the add).
pub(crate) const LANES: usize = 8;

/// `e^x` to within about 2 ulp (Cephes' `expf` polynomial after reducing by powers of two);
/// exactly 0 below -87.3, where f32 underflows.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n · ln 2 is exact in the high part.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let k = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(((k + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else {
        e * scale
    }
}

/// `erf(x)` to within a few ulp: the rational approximation Eigen and XLA use for f32
/// (`generic_fast_erf_float`), exact to f32 rounding beyond |x| = 4.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10;
    let p = p * x2 + 2.770_681_4e-8;
    let p = p * x2 + -2.101_024e-6;
    let p = p * x2 + -5.692_506_4e-5;
    let p = p * x2 + -7.349_906_3e-4;
    let p = p * x2 + -2.954_600_5e-3;
    let p = p * x2 + -1.609_603_3e-2;
    let q = -1.456_607_2e-5;
    let q = q * x2 + -2.133_740_6e-4;
    let q = q * x2 + -1.682_827e-3;
    let q = q * x2 + -7.373_329_5e-3;
    let q = q * x2 + -1.426_474e-2;
    x * p / q
}

/// The exact GELU, `x · Φ(x) = x/2 · (1 + erf(x / √2))` (PyTorch's `gelu`, HF's `"gelu"`).
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `x · sigmoid(x)` (SiLU, HF's `"silu"`).
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Sum of a slice in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// `Σ f(i)` over `0..n`, in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn sum_by(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let whole = n / LANES * LANES;
    for start in (0..whole).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(start + l);
        }
    }
    acc.iter().sum::<f32>() + (whole..n).map(&f).sum::<f32>()
}

/// Sum of squared deviations from `mean`, in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn sum_sq_dev(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>()
}

/// Dot product of two slices of equal length (the second f32 or bf16), in two vectors of
/// [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn dot<W: WeightValue>(a: &[f32], b: &[W]) -> f32 {
    let mut acc = [0.0f32; 2 * LANES];
    let chunks = a.chunks_exact(2 * LANES).zip(b.chunks_exact(2 * LANES));
    for (x, y) in chunks {
        for i in 0..2 * LANES {
            acc[i] += x[i] * y[i].get();
        }
    }
    let done = a.len() / (2 * LANES) * (2 * LANES);
    let tail: f32 = a[done..]
        .iter()
        .zip(&b[done..])
        .map(|(x, y)| x * y.get())
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Largest value of a non-empty slice, in [`LANES`] partial maxima.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Softmax of one row in place: `exp(x - max) / Σ`.
#[inline(always)]
pub(crate) fn softmax_row(x: &mut [f32]) {
    let m = max(x);
    for v in x.iter_mut() {
        *v = exp(*v - m);
    }
    let inv = 1.0 / sum(x);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

simd_fn! {
    /// `out[i] = gelu(x[i])`.
    pub(crate) fn gelu_slice(x: &[f32], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(x) {
            *o = gelu(*v);
        }
    }
}

simd_fn! {
    /// `out[i] = a[i] + b[i]`.
    pub(crate) fn add_slices(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    }
}

simd_fn! {
    /// `x[i] *= factor[i]`.
    pub(crate) fn mul_in_place(x: &mut [f32], factor: &[f32]) {
        for (v, f) in x.iter_mut().zip(factor) {
            *v *= f;
        }
    }
}

simd_fn! {
    /// The backward pass of a row-wise softmax followed by an optional factor (dropout), in
    /// place over rows of `cols` values: `grad` holds the gradient of `probs · factor` and
    /// becomes that of the scores, `probs · (g - Σ probs · g)` with `g = grad · factor`.
    pub(crate) fn softmax_backward_rows(probs: &[f32], factor: Option<&[f32]>, grad: &mut [f32], cols: usize) {
        for (i, (g, p)) in grad.chunks_exact_mut(cols).zip(probs.chunks_exact(cols)).enumerate() {
            if let Some(f) = factor {
                for (g, f) in g.iter_mut().zip(&f[i * cols..(i + 1) * cols]) {
                    *g *= f;
                }
            }
            let total = dot(p, g);
            for (g, p) in g.iter_mut().zip(p) {
                *g = p * (*g - total);
            }
        }
    }
}

/// Zeroes the masked scores' gradients, rows of `padding.len()` keys, with the masks of
/// [`masked_softmax_rows`]: a masked score is a constant, so nothing flows back through it
/// (this matters only for a row whose every key is masked, where the weights are uniform).
pub(crate) fn mask_rows(grad: &mut [f32], padding: &[bool], causal_offset: Option<isize>) {
    let keys = padding.len();
    let any_padding = padding.iter().any(|&p| p);
    for (i, row) in grad.chunks_exact_mut(keys).enumerate() {
        if any_padding {
            for (g, &p) in row.iter_mut().zip(padding) {
                if p {
                    *g = 0.0;
                }
            }
        }
        if let Some(offset) = causal_offset {
            let first_hidden = (i as isize + offset + 1).clamp(0, keys as isize) as usize;
            row[first_hidden..].fill(0.0);
        }
    }
}

simd_fn! {
    /// `acc += row` for every row of `acc.len()` values in `rows`.
    pub(crate) fn add_rows(acc: &mut [f32], rows: &[f32]) {
        for row in rows.chunks_exact(acc.len()) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

simd_fn! {
    /// `dx[i] = dy[i] · gelu'(x[i])`, the exact GELU's derivative `Φ(x) + x · φ(x)`.
    pub(crate) fn gelu_backward_slice(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        // 1 / √(2π)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for ((d, v), g) in dx.iter_mut().zip(x).zip(dy) {
            let cdf = 0.5 * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp(-0.5 * v * v);
            *d = g * (cdf + v * pdf);
        }
    }
}

simd_fn! {
    /// The backward pass of `y = LayerNorm(s) · gamma + beta` over rows of `gamma.len()`
    /// values: writes `ds` and adds each row's share of `dgamma` and `dbeta`. The mean and
    /// inverse deviation of each row are recomputed from `s`, which costs less than keeping them.
    pub(crate) fn layer_norm_backward_rows(
        s: &[f32],
        dy: &[f32],
        gamma: &[f32],
        eps: f32,
        ds: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        let cols = gamma.len();
        let n = cols as f32;
        for ((src, d), out) in s.chunks_exact(cols).zip(dy.chunks_exact(cols)).zip(ds.chunks_exact_mut(cols)) {
            let mean = sum(src) / n;
            let inv = 1.0 / (sum_sq_dev(src, mean) / n + eps).sqrt();
            // Σ dy·gamma and Σ dy·gamma·x̂ in LANES partial sums; dgamma / dbeta as we go.
            let (mut acc_g, mut acc_gx) = ([0.0f32; LANES], [0.0f32; LANES]);
            let (mut tail_g, mut tail_gx) = (0.0f32, 0.0f32);
            let whole = cols / LANES * LANES;
            for start in (0..whole).step_by(LANES) {
                let at = start..start + LANES;
                let (v, g, w) = (&src[at.clone()], &d[at.clone()], &gamma[at.clone()]);
                let (dg, db) = (&mut dgamma[at.clone()], &mut dbeta[at]);
                for l in 0..LANES {
                    let xhat = (v[l] - mean) * inv;
                    let gw = g[l] * w[l];
                    acc_g[l] += gw;
                    acc_gx[l] += gw * xhat;
                    dg[l] += g[l] * xhat;
                    db[l] += g[l];
                }
            }
            for j in whole..cols {
                let xhat = (src[j] - mean) * inv;
                let gw = d[j] * gamma[j];
                tail_g += gw;
                tail_gx += gw * xhat;
                dgamma[j] += d[j] * xhat;
                dbeta[j] += d[j];
            }
            let (acc_g, acc_gx) = (acc_g.iter().sum::<f32>() + tail_g, acc_gx.iter().sum::<f32>() + tail_gx);
            let mean_g = acc_g / n;
            let mean_gx = acc_gx / n;
            for (((o, &v), &g), &w) in out.iter_mut().zip(src).zip(d).zip(gamma) {
                let xhat = (v - mean) * inv;
                *o = inv * (g * w - mean_g - xhat * mean_gx);
            }
        }
    }
}

simd_fn! {
    /// `out[i] = silu(gate[i]) · up[i]`.
    pub(crate) fn silu_mul_slice(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu(*g) * u;
        }
    }
}

simd_fn! {
    /// `out = LayerNorm(x + residual) · gamma + beta` over rows of `gamma.len()` values.
    pub(crate) fn layer_norm_rows(
        x: &[f32],
        residual: Option<&[f32]>,
        gamma: &[f32],
        beta: Option<&[f32]>,
        eps: f32,
        out: &mut [f32],
    ) {
        let cols = gamma.len();
        for (i, row) in out.chunks_exact_mut(cols).enumerate() {
            let at = i * cols;
            row.copy_from_slice(&x[at..at + cols]);
            if let Some(r) = residual {
                for (v, r) in row.iter_mut().zip(&r[at..at + cols]) {
                    *v += r;
                }
            }
            let mean = sum(row) / cols as f32;
            let inv = 1.0 / (sum_sq_dev(row, mean) / cols as f32 + eps).sqrt();
            match beta {
                Some(b) => {
                    for ((v, g), b) in row.iter_mut().zip(gamma).zip(b) {
                        *v = (*v - mean) * inv * g + b;
                    }
                }
                None => {
                    for (v, g) in row.iter_mut().zip(gamma) {
                        *v = (*v - mean) * inv * g;
                    }
                }
            }
        }
    }
}

simd_fn! {
    /// `out = x / sqrt(mean(x²) + eps) · gamma` over rows of `gamma.len()` values.
    pub(crate) fn rms_norm_rows(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
        let cols = gamma.len();
        for (row, src) in out.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            let inv = 1.0 / (sum_sq_dev(src, 0.0) / cols as f32 + eps).sqrt();
            for ((v, x), g) in row.iter_mut().zip(src).zip(gamma) {
                *v = g * (x * inv);
            }
        }
    }
}

simd_fn! {
    /// Backward pass of [`rms_norm_rows`] over rows of `gamma.len()` values: with `u = gamma ·
    /// dy` and `r = 1 / sqrt(mean(x²) + eps)`, `dx = r · (u - x · r² · mean(u · x))`; each
    /// row's `dy · x · r` is added into `dgamma`.
    pub(crate) fn rms_norm_backward_rows(
        x: &[f32],
        dy: &[f32],
        gamma: &[f32],
        eps: f32,
        dx: &mut [f32],
        dgamma: &mut [f32],
    ) {
        let cols = gamma.len();
        let rows = x.chunks_exact(cols).zip(dy.chunks_exact(cols));
        for ((xr, dyr), dxr) in rows.zip(dx.chunks_exact_mut(cols)) {
            let r = 1.0 / (sum_sq_dev(xr, 0.0) / cols as f32 + eps).sqrt();
            let k = r * r * sum_by(cols, |c| gamma[c] * dyr[c] * xr[c]) / cols as f32;
            for c in 0..cols {
                dxr[c] = r * (gamma[c] * dyr[c] - xr[c] * k);
                dgamma[c] += dyr[c] * xr[c] * r;
            }
        }
    }
}

simd_fn! {
    /// Backward pass of [`silu_mul_slice`]: with `s = sigmoid(gate)`, `d_up = dy · gate · s`
    /// and `d_gate = dy · up · s · (1 + gate · (1 - s))`.
    pub(crate) fn silu_mul_backward_slice(
        gate: &[f32],
        up: &[f32],
        dy: &[f32],
        d_gate: &mut [f32],
        d_up: &mut [f32],
    ) {
        for i in 0..gate.len() {
            let (g, u, d) = (gate[i], up[i], dy[i]);
            let s = 1.0 / (1.0 + exp(-g));
            d_up[i] = d * g * s;
            d_gate[i] = d * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

simd_fn! {
    /// `log Σ exp(x)` of each row of `cols` values into `out` (one value per row), computed
    /// as `max + log Σ exp(x - max)`.
    pub(crate) fn log_sum_exp_rows(x: &[f32], cols: usize, out: &mut [f32]) {
        for (row, o) in x.chunks_exact(cols).zip(out.iter_mut()) {
            let m = max(row);
            *o = m + sum_by(cols, |c| exp(row[c] - m)).ln();
        }
    }
}

simd_fn! {
    /// Gradient of the cross entropy of one row of logits (whose `log Σ exp` is `lse`) against
    /// class `target`, times `scale`, written over the row: `scale · (softmax(x) - onehot)`.
    pub(crate) fn cross_entropy_backward_in_place(x: &mut [f32], lse: f32, target: usize, scale: f32) {
        for v in x.iter_mut() {
            *v = scale * exp(*v - lse);
        }
        x[target] -= scale;
    }
}

simd_fn! {
    /// Masks and normalises attention scores, rows of `padding.len()` keys: a key flagged in
    /// `padding`, or (with `causal_offset`) a key after `row + offset`, gets `f32::MIN`; then
    /// each row goes through softmax.
    pub(crate) fn masked_softmax_rows(scores: &mut [f32], padding: &[bool], causal_offset: Option<isize>) {
        let keys = padding.len();
        for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
            for (s, &p) in row.iter_mut().zip(padding) {
                if p {
                    *s = f32::MIN;
                }
            }
            if let Some(offset) = causal_offset {
                let first_hidden = (i as isize + offset + 1).clamp(0, keys as isize) as usize;
                for s in &mut row[first_hidden..] {
                    *s = f32::MIN;
                }
            }
            softmax_row(row);
        }
    }
}

/// A weight value as stored: f32, or bf16 (the high half of an f32), widened exactly.
pub(crate) trait WeightValue: Copy + Send + Sync {
    /// The value as f32.
    fn get(self) -> f32;
}

impl WeightValue for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
}

impl WeightValue for u16 {
    #[inline(always)]
    fn get(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }
}

/// How far ahead of its reading position a few-rows product asks for the weight's cache
/// lines. On a 2-core AVX-512 virtual machine with 4 KiB pages (the hardware prefetcher stops
/// at each page boundary), asking 2 KiB ahead, once per line, took one core's stream from
/// 12-13 to 14-16 GB/s and two cores' column-major product (a tied lm_head) from 24 to 31-32
/// GB/s; end to end, `ember generate` went from 27.3 to 26.4 ms per token (means of four
/// alternated pairs) and the bfloat16 generation row from 1.18-1.26 to 1.14-1.15 s. 1 and
/// 4 KiB ahead did less; interleaving the requests with the arithmetic, or reading four
/// weight rows at once, did worse.
const PREFETCH_AHEAD: usize = 2048;
/// Products with up to this many rows prefetch. With more (batch-8 decoding) each weight line
/// feeds more arithmetic and the prefetches cost more than they hide: the batch-8 generation
/// row took 4.38-4.42 s with them against 3.92-4.16 s without.
const PREFETCH_ROWS: usize = 2;

/// For a product of `rows` input rows (up to [`PREFETCH_ROWS`]), asks for the cache lines
/// [`PREFETCH_AHEAD`] bytes past each line of `values`, the part of the weight read next. A
/// hint: it reads nothing and never faults, past the weight's end included.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn prefetch_ahead_of<W>(values: &[W], rows: usize) {
    #[cfg(target_arch = "x86_64")]
    if rows <= PREFETCH_ROWS {
        let start = values.as_ptr().cast::<u8>().wrapping_add(PREFETCH_AHEAD);
        for at in (0..std::mem::size_of_val(values)).step_by(64) {
            // SAFETY: a prefetch is a hint; it reads nothing and never faults.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    start.wrapping_add(at).cast(),
                )
            };
        }
    }
}

/// `ys[r] += Σ_{kk in k_rows} xs[r · k + kk] · w[kk · w_stride ..][..n]` for the `rows` rows
/// of `ys` (`n = ys.len() / rows`): one block of weight rows of a product with few rows,
/// read front to back once, each weight row used for every input row while it is in L1.
#[inline(always)]
fn few_rows_axpy_any<W: WeightValue>(
    ys: &mut [f32],
    xs: &[f32],
    k: usize,
    k_rows: std::ops::Range<usize>,
    w: &[W],
    w_stride: usize,
) {
    let rows = xs.len() / k;
    let n = ys.len() / rows;
    for kk in k_rows {
        let seg = &w[kk * w_stride..kk * w_stride + n];
        prefetch_ahead_of(seg, rows);
        for r in 0..rows {
            let xk = xs[r * k + kk];
            for (y, w) in ys[r * n..(r + 1) * n].iter_mut().zip(seg) {
                *y += xk * w.get();
            }
        }
    }
}

/// `ys[r · cols + j] += dot(xs[r], w[j · w_stride ..][..k])` for `cols = ys.len() / rows`
/// weight columns stored contiguously (a transposed, column-major weight), where `xs` holds
/// `rows` rows of `k` values.
#[inline(always)]
fn few_rows_dots_any<W: WeightValue>(
    ys: &mut [f32],
    xs: &[f32],
    w: &[W],
    k: usize,
    w_stride: usize,
) {
    let rows = xs.len() / k;
    let cols = ys.len() / rows;
    for j in 0..cols {
        let col = &w[j * w_stride..j * w_stride + k];
        prefetch_ahead_of(col, rows);
        for r in 0..rows {
            ys[r * cols + j] += dot(&xs[r * k..(r + 1) * k], col);
        }
    }
}

simd_fn! {
    /// [`few_rows_axpy_any`] over an f32 weight.
    pub(crate) fn few_rows_axpy(ys: &mut [f32], xs: &[f32], k: usize, k_rows: std::ops::Range<usize>, w: &[f32], w_stride: usize) {
        few_rows_axpy_any(ys, xs, k, k_rows, w, w_stride)
    }
}

simd_fn! {
    /// [`few_rows_axpy_any`] over a bf16 copy of a weight.
    pub(crate) fn few_rows_axpy_bf16(ys: &mut [f32], xs: &[f32], k: usize, k_rows: std::ops::Range<usize>, w: &[u16], w_stride: usize) {
        few_rows_axpy_any(ys, xs, k, k_rows, w, w_stride)
    }
}

simd_fn! {
    /// [`few_rows_dots_any`] over an f32 weight.
    pub(crate) fn few_rows_dots(ys: &mut [f32], xs: &[f32], w: &[f32], k: usize, w_stride: usize) {
        few_rows_dots_any(ys, xs, w, k, w_stride)
    }
}

simd_fn! {
    /// [`few_rows_dots_any`] over a bf16 copy of a weight.
    pub(crate) fn few_rows_dots_bf16(ys: &mut [f32], xs: &[f32], w: &[u16], k: usize, w_stride: usize) {
        few_rows_dots_any(ys, xs, w, k, w_stride)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Set by a test to run the AVX2 build of the kernels on a CPU with AVX-512.
    pub(crate) static NARROW: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);

    #[test]
    fn the_avx512_and_avx2_builds_give_the_same_values() {
        use std::sync::atomic::Ordering;
        let x: Vec<f32> = (0..3 * 1000)
            .map(|i| ((i * 7919) % 2003) as f32 / 97.0 - 10.0)
            .collect();
        let run = || {
            let mut lse = vec![0.0f32; 3];
            log_sum_exp_rows(&x, 1000, &mut lse);
            let mut gelu = vec![0.0f32; x.len()];
            gelu_slice(&x, &mut gelu);
            let mut gated = vec![0.0f32; x.len()];
            silu_mul_slice(&x, &x, &mut gated);
            let mut probs = x.clone();
            masked_softmax_rows(&mut probs, &[false; 1000], Some(0));
            [lse, gelu, gated, probs]
        };
        let wide = run();
        NARROW.store(true, Ordering::Relaxed);
        let narrow = run();
        NARROW.store(false, Ordering::Relaxed);
        for (w, n) in wide.iter().zip(&narrow) {
            for (a, b) in w.iter().zip(n) {
                assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{a} against {b}");
            }
        }
    }

    /// Largest error relative to the f64 reference, over a dense grid of `[lo, hi]`.
    fn worst(f: fn(f32) -> f32, reference: fn(f64) -> f64, lo: f32, hi: f32) -> f64 {
        let n = 200_000;
        (0..=n)
            .map(|i| {
                let x = lo + (hi - lo) * i as f32 / n as f32;
                let want = reference(x as f64);
                (f(x) as f64 - want).abs() / want.abs().max(1e-30)
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn exp_is_within_a_few_ulp() {
        assert!(worst(exp, f64::exp, -87.0, 88.0) < 4e-7);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn gelu_matches_the_erf_definition() {
        // erf from the series of libm through f64, the reference PyTorch's own erf is close to.
        fn gelu64(x: f64) -> f64 {
            0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2))
        }
        fn erf64(x: f64) -> f64 {
            // Abramowitz-Stegun 7.1.28 is too coarse; integrate the Taylor series instead.
            if x.abs() > 5.0 {
                return x.signum();
            }
            let (mut term, mut total, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                total += term / (2.0 * n + 1.0);
            }
            total * 2.0 / std::f64::consts::PI.sqrt()
        }
        // Absolute error against the scale of the input: 1 + erf(x/√2) cancels for negative
        // x in any f32 evaluation (PyTorch's too), so relative error is no measure there.
        let n = 400_000;
        let worst_abs = (0..=n)
            .map(|i| {
                let x = -8.0 + 16.0 * i as f32 / n as f32;
                (gelu(x) as f64 - gelu64(x as f64)).abs() / (x.abs() as f64).max(1.0)
            })
            .fold(0.0, f64::max);
        assert!(worst_abs < 4e-7, "{worst_abs}");
        assert!(worst(gelu, gelu64, 0.05, 8.0) < 1e-6);
    }

    #[test]
    fn softmax_row_sums_to_one_and_ignores_minimum_scores() {
        let mut row = [1.0f32, 2.0, f32::MIN, 3.0, 0.5, -1.0, 4.0, 2.5, 1.5, 0.0];
        softmax_row(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(row[2], 0.0);
        let z: f64 = [1.0f64, 2.0, 3.0, 0.5, -1.0, 4.0, 2.5, 1.5, 0.0]
            .iter()
            .map(|v| v.exp())
            .sum();
        assert!((row[6] as f64 - 4f64.exp() / z).abs() < 1e-7);
        // Every score masked: uniform, as `softmax(scores.masked_fill(mask, f32::MIN))` gives.
        let mut all = [f32::MIN; 4];
        softmax_row(&mut all);
        assert_eq!(all, [0.25; 4]);
    }

    #[test]
    fn reductions_cover_the_tail() {
        let x: Vec<f32> = (0..19).map(|i| i as f32).collect();
        assert_eq!(sum(&x), 171.0);
        assert_eq!(max(&x), 18.0);
        assert_eq!(sum_sq_dev(&[1.0, 3.0], 2.0), 2.0);
    }

    /// The products ask for lines [`PREFETCH_AHEAD`] bytes past their weight: a weight that
    /// ends at the last readable byte before an inaccessible page gives the plain sums.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn few_rows_products_read_up_to_an_inaccessible_page() {
        // SAFETY: `sysconf` only reads a system setting.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
        // SAFETY: a fresh private mapping of two pages, the second made inaccessible; the
        // slice covers the end of the first page only and the mapping is unmapped after its
        // last use.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(base, libc::MAP_FAILED);
            assert_eq!(
                libc::mprotect(base.cast::<u8>().add(page).cast(), page, libc::PROT_NONE),
                0
            );
            // 32 rows of 32 values, ending where the first page ends.
            let (k, n) = (32, 32);
            let w = std::slice::from_raw_parts_mut(
                base.cast::<u8>().add(page - k * n * 4).cast::<f32>(),
                k * n,
            );
            for (i, v) in w.iter_mut().enumerate() {
                *v = ((i * 37) % 11) as f32 - 5.0;
            }
            let xs: Vec<f32> = (0..k).map(|i| (i % 5) as f32 - 2.0).collect();
            let expected: Vec<f32> = (0..n)
                .map(|j| (0..k).map(|kk| xs[kk] * w[kk * n + j]).sum())
                .collect();
            let mut ys = vec![0.0f32; n];
            few_rows_axpy(&mut ys, &xs, k, 0..k, w, n);
            assert_eq!(ys, expected);
            // Read as 32 columns of 32 values: column j is row j of the page.
            let expected: Vec<f32> = (0..n)
                .map(|j| (0..k).map(|kk| xs[kk] * w[j * k + kk]).sum())
                .collect();
            let mut ys = vec![0.0f32; n];
            few_rows_dots(&mut ys, &xs, w, k, k);
            for (y, e) in ys.iter().zip(&expected) {
                assert!((y - e).abs() < 1e-4, "{y} vs {e}");
            }
            assert_eq!(libc::munmap(base, 2 * page), 0);
        }
    }
}
