//! What an upload says it is against what its bytes are: a declared image
//! must be that image (its magic bytes), and its width and height are read
//! from the first bytes when they are there (the thumbnailer fills them in
//! otherwise).

use image::ImageFormat;

use super::MediaError;

/// The bytes looked at: enough for any image header but a JPEG's behind a
/// large EXIF block.
pub const HEAD_BYTES: usize = 64 * 1024;
/// The longest `Content-Type` kept.
const MAX_CONTENT_TYPE: usize = 100;
/// Without a `Content-Type` an upload is opaque bytes.
const OPAQUE: &str = "application/octet-stream";

/// The image types an upload may declare (and the thumbnailer decodes).
const IMAGES: [(&str, ImageFormat); 4] = [
    ("image/png", ImageFormat::Png),
    ("image/jpeg", ImageFormat::Jpeg),
    ("image/gif", ImageFormat::Gif),
    ("image/webp", ImageFormat::WebP),
];

/// An upload's declared type, checked for shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// `type/subtype`, lowercase, without parameters.
    pub content_type: String,
    /// The image format the bytes must be, for an image.
    image: Option<ImageFormat>,
}

impl Declared {
    /// The type of a `Content-Type` header (absent: opaque bytes). Any
    /// `image/*` but the four decodable ones is refused: an SVG, say, is a
    /// document that runs scripts, not a picture.
    pub fn parse(header: Option<&str>) -> Result<Self, MediaError> {
        let Some(header) = header else {
            return Ok(Self {
                content_type: OPAQUE.into(),
                image: None,
            });
        };
        let essence = header
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let token = |part: &str| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        let well_formed = essence.len() <= MAX_CONTENT_TYPE
            && essence
                .split_once('/')
                .is_some_and(|(kind, sub)| token(kind) && token(sub));
        if !well_formed {
            return Err(MediaError::BadRequest(
                "Content-Type must be type/subtype".into(),
            ));
        }
        let essence = if essence == "image/jpg" {
            "image/jpeg".to_string()
        } else {
            essence
        };
        let image = IMAGES
            .iter()
            .find(|(name, _)| *name == essence)
            .map(|(_, format)| *format);
        if essence.starts_with("image/") && image.is_none() {
            return Err(MediaError::Unsupported(format!(
                "{essence} is not an image type this server takes (image/png, image/jpeg, \
                 image/gif, image/webp); send it as application/octet-stream"
            )));
        }
        Ok(Self {
            content_type: essence,
            image,
        })
    }

    /// Checks the first bytes (at most [`HEAD_BYTES`], all of them for a
    /// shorter upload) against the declared type; an image's width and
    /// height when its header is in them.
    pub fn check(&self, head: &[u8]) -> Result<Option<(u32, u32)>, MediaError> {
        let Some(format) = self.image else {
            return Ok(None);
        };
        if image::guess_format(head).ok() != Some(format) {
            return Err(MediaError::Unsupported(format!(
                "declared {} but the bytes are not a {} image",
                self.content_type,
                format.extensions_str().first().unwrap_or(&"")
            )));
        }
        let dimensions =
            image::ImageReader::with_format(std::io::Cursor::new(head), format).into_dimensions();
        Ok(dimensions.ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3x2 PNG.
    fn png() -> Vec<u8> {
        let mut bytes = Vec::new();
        image::RgbImage::new(3, 2)
            .write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        bytes
    }

    #[test]
    fn a_declared_image_must_be_that_image() {
        let declared = Declared::parse(Some("image/png")).unwrap();
        assert_eq!(declared.check(&png()).unwrap(), Some((3, 2)));
        let lie = declared.check(b"GIF89a not really");
        assert!(matches!(lie, Err(MediaError::Unsupported(_))), "{lie:?}");
        let jpeg = Declared::parse(Some("image/jpeg; q=1")).unwrap();
        assert!(matches!(
            jpeg.check(&png()),
            Err(MediaError::Unsupported(_))
        ));
    }

    #[test]
    fn other_types_pass_as_declared() {
        let pdf = Declared::parse(Some("Application/PDF")).unwrap();
        assert_eq!(pdf.content_type, "application/pdf");
        assert_eq!(pdf.check(b"%PDF-1.7").unwrap(), None);
        assert_eq!(Declared::parse(None).unwrap().content_type, OPAQUE);
        assert!(matches!(
            Declared::parse(Some("image/svg+xml")),
            Err(MediaError::Unsupported(_))
        ));
        for bad in [
            "",
            "text",
            "a/b c",
            "a/<b>",
            &format!("a/{}", "b".repeat(200)),
        ] {
            assert!(
                matches!(Declared::parse(Some(bad)), Err(MediaError::BadRequest(_))),
                "{bad}"
            );
        }
    }
}
