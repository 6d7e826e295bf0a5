//! Text on charts, laid out and rasterised with `ab_glyph`: each glyph at its pen position
//! plus its own bearing (plotters' `ab_glyph` text drops the bearing, which spaces glyphs
//! oddly: `99. 9%`).
#![forbid(unsafe_code)]

use ab_glyph::{Font as _, FontRef, PxScale, ScaleFont as _};
use plotters::coord::Shift;
use plotters::prelude::{DrawingArea, DrawingBackend};
use plotters::style::{Color as _, RGBColor};

/// Where the anchor point is on the text's box.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Anchor {
    /// Left edge, vertical middle.
    Left,
    /// Right edge, vertical middle.
    Right,
    /// Horizontal middle, top edge.
    Top,
}

/// A font and a size to draw with.
pub(crate) struct Pen<'f> {
    pub(crate) font: &'f FontRef<'f>,
    pub(crate) px: f32,
    pub(crate) colour: RGBColor,
}

impl Pen<'_> {
    /// The glyphs of `text` at their pen positions (kerned advances), and the width.
    fn layout(&self, text: &str) -> (Vec<(ab_glyph::GlyphId, f32)>, f32) {
        let font = self.font.as_scaled(PxScale::from(self.px));
        let mut x = 0.0;
        let mut prev = None;
        let mut glyphs = Vec::with_capacity(text.len());
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                x += font.kern(p, id);
            }
            glyphs.push((id, x));
            x += font.h_advance(id);
            prev = Some(id);
        }
        (glyphs, x)
    }

    /// Draws `text` on `area` (backend pixels) with its `anchor` at `at`.
    ///
    /// # Errors
    /// The backend failed to draw.
    pub(crate) fn draw<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        text: &str,
        at: (i32, i32),
        anchor: Anchor,
    ) -> Result<(), plotters::drawing::DrawingAreaErrorKind<DB::ErrorType>> {
        let font = self.font.as_scaled(PxScale::from(self.px));
        let (glyphs, width) = self.layout(text);
        let height = font.ascent() - font.descent();
        let (dx, dy) = match anchor {
            Anchor::Left => (0.0, height / 2.0),
            Anchor::Right => (width, height / 2.0),
            Anchor::Top => (width / 2.0, 0.0),
        };
        let origin = (at.0 as f32 - dx, at.1 as f32 - dy + font.ascent());
        for (id, x) in glyphs {
            let glyph = id.with_scale_and_position(
                PxScale::from(self.px),
                ab_glyph::point(origin.0 + x, origin.1),
            );
            let Some(outline) = self.font.outline_glyph(glyph) else {
                continue;
            };
            // The glyph's pixels from its own bounds: its bearing kept.
            let bounds = outline.px_bounds();
            let mut pixels = Vec::new();
            outline.draw(|x, y, coverage| pixels.push((x, y, coverage)));
            for (x, y, coverage) in pixels.into_iter().filter(|p| p.2 > 0.0) {
                area.draw_pixel(
                    (
                        bounds.min.x as i32 + x as i32,
                        bounds.min.y as i32 + y as i32,
                    ),
                    &self.colour.mix(f64::from(coverage.min(1.0))),
                )?;
            }
        }
        Ok(())
    }
}
