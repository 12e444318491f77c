//! Placeholder: being written.

use super::{Scan, Window};

pub(crate) fn scan(_w: &Window<'_>) -> Option<Scan> {
    None
}
