//! A captured frame. Its pixels never leave this crate un-redacted.

use image::RgbImage;

pub struct Frame {
    image: RgbImage,
    origin: String,
}

impl Frame {
    pub(crate) fn new(image: RgbImage, origin: String) -> Self {
        Frame { image, origin }
    }

    pub(crate) fn image(&self) -> &RgbImage {
        &self.image
    }

    pub fn width(&self) -> u32 {
        self.image.width()
    }

    pub fn height(&self) -> u32 {
        self.image.height()
    }

    /// Where the frame came from: a device path or a photo's file name.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Mean and standard deviation of the luma (BT.601), 0..255. A covered lens gives
    /// a near-zero deviation.
    pub fn luma_stats(&self) -> (f32, f32) {
        let n = (self.image.width() as f64 * self.image.height() as f64).max(1.0);
        let (mut sum, mut sq) = (0f64, 0f64);
        for p in self.image.pixels() {
            let y = 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64;
            sum += y;
            sq += y * y;
        }
        let mean = sum / n;
        let var = (sq / n - mean * mean).max(0.0);
        (mean as f32, var.sqrt() as f32)
    }
}

impl std::fmt::Debug for Frame {
    // Never print pixels.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frame({}x{} from {})", self.width(), self.height(), self.origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_of_uniform_and_striped_frames() {
        let f = Frame::new(RgbImage::from_pixel(8, 8, image::Rgb([10, 10, 10])), "t".into());
        let (m, s) = f.luma_stats();
        assert!((m - 10.0).abs() < 0.01 && s < 0.01);
        let img = RgbImage::from_fn(8, 8, |x, _| {
            if x % 2 == 0 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let (m, s) = Frame::new(img, "t".into()).luma_stats();
        assert!((m - 127.5).abs() < 0.1 && (s - 127.5).abs() < 0.1);
    }
}
