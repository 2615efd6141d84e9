//! How an `image` model's input pixels are laid out on the wire.

use serde::{Deserialize, Serialize};

use crate::version::ProtocolVersion;

/// The layout of an `image` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageLayout {
    /// `[N,3,H,W]`: one plane per channel, as models take them.
    Planes,
    /// `[N,H,W,3]`: rows of pixels, as image files, PIL and numpy hold
    /// them, so that no client has to transpose (protocol 1.4).
    Rows,
}

impl ImageLayout {
    /// The layout of an image input of `shape` sent by a peer speaking
    /// `peer`, told by where its three channels are; `None` for a shape
    /// that is neither. A shape that could be both (`[N,3,H,3]`) is rows
    /// from peers of 1.4 and later, which send rows; older peers send
    /// planes only.
    pub fn of(shape: &[u64], peer: ProtocolVersion) -> Option<ImageLayout> {
        let [_, second, _, last] = shape[..] else {
            return None;
        };
        if peer.sends_pixel_rows() && last == 3 {
            Some(ImageLayout::Rows)
        } else if second == 3 {
            Some(ImageLayout::Planes)
        } else {
            None
        }
    }

    /// `(N, H, W)` of an image of `shape` in this layout.
    pub fn dims(self, shape: &[u64]) -> Option<(u64, u64, u64)> {
        match (self, shape) {
            (ImageLayout::Planes, [n, 3, h, w]) | (ImageLayout::Rows, [n, h, w, 3]) => {
                Some((*n, *h, *w))
            }
            _ => None,
        }
    }
}

/// What an image input must look like, for error messages.
pub const IMAGE_SHAPES: &str = "[N,3,H,W] (planes) or [N,H,W,3] (rows of pixels, protocol 1.4)";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{PIXEL_ROWS, PIXEL_ROWS_IN};

    const NEW: ProtocolVersion = PIXEL_ROWS_IN;
    const OLD: ProtocolVersion = PIXEL_ROWS;

    #[test]
    fn the_channels_tell_the_layout() {
        assert_eq!(
            ImageLayout::of(&[1, 3, 480, 640], NEW),
            Some(ImageLayout::Planes)
        );
        assert_eq!(
            ImageLayout::of(&[1, 480, 640, 3], NEW),
            Some(ImageLayout::Rows)
        );
        assert_eq!(
            ImageLayout::of(&[2, 3, 480, 640], OLD),
            Some(ImageLayout::Planes)
        );
        // Before 1.4 only planes were sent.
        assert_eq!(ImageLayout::of(&[1, 480, 640, 3], OLD), None);
        // Both readings fit: a peer of 1.4 sends rows.
        assert_eq!(ImageLayout::of(&[1, 3, 5, 3], NEW), Some(ImageLayout::Rows));
        assert_eq!(
            ImageLayout::of(&[1, 3, 5, 3], OLD),
            Some(ImageLayout::Planes)
        );
        for shape in [&[1, 4, 5, 6][..], &[3, 5, 6], &[], &[1, 1, 3, 5, 6]] {
            assert_eq!(ImageLayout::of(shape, NEW), None, "{shape:?}");
        }
    }

    #[test]
    fn dimensions_in_either_layout() {
        assert_eq!(
            ImageLayout::Planes.dims(&[2, 3, 480, 640]),
            Some((2, 480, 640))
        );
        assert_eq!(
            ImageLayout::Rows.dims(&[2, 480, 640, 3]),
            Some((2, 480, 640))
        );
        assert_eq!(ImageLayout::Rows.dims(&[2, 3, 480, 640]), None);
        assert_eq!(ImageLayout::Planes.dims(&[2, 480]), None);
    }
}
