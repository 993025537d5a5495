//! The one progress-bar constructor of the CLI (snapshot jobs, adopt,
//! export and import, projection rebuilds).

use std::borrow::Cow;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar drawn with indicatif `template` on stderr when stderr is
/// a terminal, and hidden otherwise, so pipes, logs and tests get only the
/// summary. `prefix` fills `{prefix}`.
pub(crate) fn progress_bar(template: &str, prefix: impl Into<Cow<'static, str>>) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(None, target).with_prefix(prefix);
    // A template is a constant of the caller: a bad one keeps the default
    // style rather than failing the command.
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}
