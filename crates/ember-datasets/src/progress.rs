//! Progress bars on stderr for long operations (`map`), hidden when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` steps labelled `what`.
pub(crate) fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg}: {percent:>3}%|{wide_bar}| {pos}/{len} [{elapsed}<{eta}, {per_sec}]",
    ) {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    bar
}
