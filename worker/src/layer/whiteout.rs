//! Overlayfs metadata in an upper dir: which xattrs make a directory opaque, which are the
//! kernel's bookkeeping to drop, and which (redirect, metacopy) mean the upper dir cannot be
//! expressed as an OCI layer at all.

/// Name of the marker entry that makes a directory opaque in an OCI layer.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Prefix of whiteout entries (and of every name OCI reserves).
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";

/// What an extended attribute means to the layer writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayXattr {
    /// Not an overlay attribute: subject to the keep-list.
    Foreign,
    /// `*.overlay.opaque`; the directory is opaque when its value is `y`.
    Opaque,
    /// `*.overlay.redirect`: a renamed directory whose contents live elsewhere in a lower.
    Redirect,
    /// `*.overlay.metacopy`: a file whose data lives in a lower layer.
    Metacopy,
    /// Any other overlay bookkeeping (origin, impure, nlink, escaped user attributes…).
    Dropped,
}

/// Classifies an xattr name. Both namespaces count, as overlay uses `user.overlay.*` when
/// mounted with `userxattr` (unprivileged overlay in a user namespace).
pub fn classify(name: &[u8]) -> OverlayXattr {
    let rest = name
        .strip_prefix(b"trusted.overlay.")
        .or_else(|| name.strip_prefix(b"user.overlay."));
    match rest {
        None => OverlayXattr::Foreign,
        Some(b"opaque") => OverlayXattr::Opaque,
        Some(b"redirect") => OverlayXattr::Redirect,
        Some(b"metacopy") => OverlayXattr::Metacopy,
        // Includes `overlay.overlay.*`: attributes the job set on its own files through the
        // mount, which the kernel escapes; they must not turn into real overlay semantics.
        Some(_) => OverlayXattr::Dropped,
    }
}

/// Whether an opaque attribute's value marks the directory opaque. Newer kernels also write
/// `x` ("has xwhiteouts", a lower-layer feature), which is not opacity.
pub fn is_opaque_value(value: &[u8]) -> bool {
    value == b"y"
}

/// The layer name of a whiteout for `name`.
pub fn whiteout_name(name: &[u8]) -> Vec<u8> {
    [WHITEOUT_PREFIX, name].concat()
}

/// Whether a real file's name collides with OCI's reserved `.wh.` prefix. Such a file would
/// read back as a whiteout (deleting a base file) or an opaque marker, so it is never stored.
pub fn is_reserved(name: &[u8]) -> bool {
    name.starts_with(WHITEOUT_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_overlay_xattrs() {
        assert_eq!(classify(b"trusted.overlay.opaque"), OverlayXattr::Opaque);
        assert_eq!(classify(b"user.overlay.opaque"), OverlayXattr::Opaque);
        assert_eq!(
            classify(b"trusted.overlay.redirect"),
            OverlayXattr::Redirect
        );
        assert_eq!(classify(b"user.overlay.metacopy"), OverlayXattr::Metacopy);
        assert_eq!(classify(b"trusted.overlay.origin"), OverlayXattr::Dropped);
        assert_eq!(
            classify(b"user.overlay.overlay.opaque"),
            OverlayXattr::Dropped
        );
        assert_eq!(classify(b"user.mime_type"), OverlayXattr::Foreign);
        assert!(is_opaque_value(b"y") && !is_opaque_value(b"x"));
    }
}
