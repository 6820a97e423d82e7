//! The clean-desk rules: detections and frame statistics in, debounced findings out.
//!
//! Each rule first decides whether one frame is positive, then the engine applies the
//! rule's debounce (`frames` consecutive positive frames) and cooldown (no repeat of
//! the same rule within `cooldown`). Time is passed in; nothing here reads a clock.

use serde::{Deserialize, Serialize};

use crate::config::{ObjectRule, RulesConfig};
use crate::detection::{Detection, BOOK, CELL_PHONE, PERSON};
use crate::Millis;

/// The rules of the design, by their wire names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    Phone,
    Paper,
    ExtraPerson,
    Absent,
    Covered,
}

impl RuleKind {
    pub const ALL: [RuleKind; 5] =
        [RuleKind::Phone, RuleKind::Paper, RuleKind::ExtraPerson, RuleKind::Absent, RuleKind::Covered];

    pub fn name(self) -> &'static str {
        match self {
            RuleKind::Phone => "phone",
            RuleKind::Paper => "paper",
            RuleKind::ExtraPerson => "extra_person",
            RuleKind::Absent => "absent",
            RuleKind::Covered => "covered",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What the vision stage knows about one analysed frame.
#[derive(Clone, Debug)]
pub struct FrameFacts<'a> {
    pub now: Millis,
    pub width: u32,
    pub height: u32,
    pub detections: &'a [Detection],
    /// Standard deviation of the frame's luma (0..255): near 0 for a covered lens.
    pub luma_stddev: f32,
}

/// A rule that fired: the evidence an event is built from.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub rule: RuleKind,
    /// Confidence of the finding in 0..1 (the detector's score where there is one).
    pub score: f32,
    /// The detections that caused it (empty for `absent` and `covered`).
    pub objects: Vec<Detection>,
}

/// The outcome of one frame: which rules saw a positive frame, and which fired.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    pub positive: Vec<RuleKind>,
    pub findings: Vec<Finding>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Debounce {
    streak: u32,
    last_fired: Option<Millis>,
}

/// Applies the rules frame by frame, keeping the debounce and cooldown state.
#[derive(Clone, Debug)]
pub struct RuleEngine {
    config: RulesConfig,
    state: [Debounce; 5],
    /// When a person was last seen, or when observation (re)started.
    present_since: Option<Millis>,
}

impl RuleEngine {
    pub fn new(config: RulesConfig) -> Self {
        RuleEngine { config, state: [Debounce::default(); 5], present_since: None }
    }

    /// A new look at the desk begins (the shutter opened): streaks of positive frames
    /// from an earlier look do not carry over into this one.
    pub fn begin_check(&mut self) {
        for st in &mut self.state {
            st.streak = 0;
        }
    }

    /// Restart the `absent` clock, e.g. at the end of a break or after the camera came
    /// back: the grace period counts from `now`.
    pub fn restart_presence(&mut self, now: Millis) {
        self.present_since = Some(now);
    }

    /// Evaluates one analysed frame.
    pub fn evaluate(&mut self, facts: &FrameFacts<'_>) -> Verdict {
        let c = &self.config;
        let mut candidates: Vec<(RuleKind, Option<Finding>, u32, u64)> = Vec::with_capacity(5);

        if c.phone.enabled {
            candidates.push((
                RuleKind::Phone,
                objects_in_region(facts, CELL_PHONE, &c.phone, RuleKind::Phone),
                c.phone.frames,
                c.phone.cooldown.0,
            ));
        }
        if c.paper.enabled {
            candidates.push((
                RuleKind::Paper,
                objects_in_region(facts, BOOK, &c.paper, RuleKind::Paper),
                c.paper.frames,
                c.paper.cooldown.0,
            ));
        }
        let people: Vec<&Detection> = facts.detections.iter().filter(|d| d.class_id == PERSON).collect();
        if c.extra_person.enabled {
            let mut persons: Vec<Detection> =
                people.iter().filter(|d| d.score >= c.extra_person.min_score).map(|d| (*d).clone()).collect();
            persons.sort_by(|a, b| b.score.total_cmp(&a.score));
            let n = c.extra_person.min_count as usize;
            let finding = (persons.len() >= n).then(|| Finding {
                rule: RuleKind::ExtraPerson,
                // As sure as the least sure of the people needed to reach the count.
                score: persons[n - 1].score,
                objects: persons,
            });
            candidates.push((
                RuleKind::ExtraPerson,
                finding,
                c.extra_person.frames,
                c.extra_person.cooldown.0,
            ));
        }
        if c.absent.enabled {
            let present = people.iter().any(|d| d.score >= c.absent.min_score);
            let since = *self.present_since.get_or_insert(facts.now);
            let finding = if present {
                self.present_since = Some(facts.now);
                None
            } else {
                (facts.now.saturating_sub(since) >= c.absent.grace.0).then(|| Finding {
                    rule: RuleKind::Absent,
                    score: 1.0,
                    objects: Vec::new(),
                })
            };
            candidates.push((RuleKind::Absent, finding, c.absent.frames, c.absent.cooldown.0));
        }
        if c.covered.enabled {
            let finding = (facts.luma_stddev < c.covered.max_stddev).then(|| Finding {
                rule: RuleKind::Covered,
                score: (1.0 - facts.luma_stddev / c.covered.max_stddev.max(f32::EPSILON)).clamp(0.0, 1.0),
                objects: Vec::new(),
            });
            candidates.push((RuleKind::Covered, finding, c.covered.frames, c.covered.cooldown.0));
        }

        let mut verdict = Verdict::default();
        for (rule, finding, frames, cooldown) in candidates {
            let st = &mut self.state[rule.index()];
            let Some(finding) = finding else {
                st.streak = 0;
                continue;
            };
            verdict.positive.push(rule);
            st.streak = st.streak.saturating_add(1);
            let cooled = st.last_fired.is_none_or(|t| facts.now.saturating_sub(t) >= cooldown);
            if st.streak >= frames && cooled {
                st.last_fired = Some(facts.now);
                verdict.findings.push(finding);
            }
        }
        verdict
    }
}

fn objects_in_region(
    facts: &FrameFacts<'_>,
    class: usize,
    rule: &ObjectRule,
    kind: RuleKind,
) -> Option<Finding> {
    let (w, h) = (facts.width.max(1) as f32, facts.height.max(1) as f32);
    let objects: Vec<Detection> = facts
        .detections
        .iter()
        .filter(|d| d.class_id == class && d.score >= rule.min_score)
        .filter(|d| {
            let (cx, cy) = d.bbox.center();
            rule.region.contains(cx / w, cy / h)
        })
        .cloned()
        .collect();
    let score =
        objects.iter().map(|d| d.score).fold(None, |m: Option<f32>, s| Some(m.map_or(s, |m| m.max(s))))?;
    Some(Finding { rule: kind, score, objects })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Region};
    use crate::detection::BBox;
    use crate::duration::Span;

    fn det(class_id: usize, score: f32, x: f32) -> Detection {
        Detection { class_id, score, bbox: BBox::new(x, 100.0, x + 50.0, 200.0) }
    }

    /// Every rule fires on its first positive frame and may repeat at once, then
    /// `tweak` adjusts the config for the test at hand.
    fn engine(tweak: impl FnOnce(&mut RulesConfig)) -> RuleEngine {
        let mut rules = Config::default().rules;
        for r in [&mut rules.phone, &mut rules.paper] {
            r.frames = 1;
            r.cooldown = Span(0);
        }
        rules.extra_person.frames = 1;
        rules.extra_person.cooldown = Span(0);
        rules.covered.frames = 1;
        rules.covered.cooldown = Span(0);
        rules.absent.grace = Span(10_000);
        rules.absent.frames = 1;
        rules.absent.cooldown = Span(0);
        tweak(&mut rules);
        RuleEngine::new(rules)
    }

    fn facts(now: Millis, dets: &[Detection]) -> FrameFacts<'_> {
        FrameFacts { now, width: 640, height: 480, detections: dets, luma_stddev: 50.0 }
    }

    fn fired(v: &Verdict) -> Vec<RuleKind> {
        v.findings.iter().map(|f| f.rule).collect()
    }

    #[test]
    fn phone_fires_above_min_score_only() {
        let mut e = engine(|_| ());
        let v = e.evaluate(&facts(0, &[det(PERSON, 0.9, 0.0), det(CELL_PHONE, 0.5, 300.0)]));
        assert_eq!(fired(&v), vec![RuleKind::Phone]);
        assert_eq!(v.findings[0].objects.len(), 1);
        let v = e.evaluate(&facts(1, &[det(PERSON, 0.9, 0.0), det(CELL_PHONE, 0.2, 300.0)]));
        assert!(fired(&v).is_empty());
    }

    #[test]
    fn phone_outside_the_desk_region_is_ignored() {
        // Region: bottom half of the frame. The box centre is at y = 150 of 480.
        let mut e = engine(|r| r.phone.region = Region(vec![(0.0, 0.5), (1.0, 0.5), (1.0, 1.0), (0.0, 1.0)]));
        let v = e.evaluate(&facts(0, &[det(PERSON, 0.9, 0.0), det(CELL_PHONE, 0.9, 300.0)]));
        assert!(!fired(&v).contains(&RuleKind::Phone));
    }

    #[test]
    fn two_people_fire_extra_person_one_does_not() {
        let mut e = engine(|_| ());
        assert_eq!(
            fired(&e.evaluate(&facts(0, &[det(PERSON, 0.9, 0.0), det(PERSON, 0.8, 200.0)]))),
            vec![RuleKind::ExtraPerson]
        );
        assert!(fired(&e.evaluate(&facts(1, &[det(PERSON, 0.9, 0.0), det(PERSON, 0.1, 200.0)]))).is_empty());
    }

    #[test]
    fn debounce_needs_consecutive_frames_and_cooldown_blocks_repeats() {
        let mut e = engine(|r| {
            r.phone.frames = 3;
            r.phone.cooldown = Span(60_000);
        });
        let p = [det(PERSON, 0.9, 0.0), det(CELL_PHONE, 0.9, 300.0)];
        let none = [det(PERSON, 0.9, 0.0)];
        assert!(fired(&e.evaluate(&facts(0, &p))).is_empty());
        assert!(fired(&e.evaluate(&facts(1000, &p))).is_empty());
        assert!(fired(&e.evaluate(&facts(1500, &none))).is_empty(), "a gap resets the streak");
        assert!(fired(&e.evaluate(&facts(2000, &p))).is_empty());
        assert!(fired(&e.evaluate(&facts(3000, &p))).is_empty());
        assert_eq!(fired(&e.evaluate(&facts(4000, &p))), vec![RuleKind::Phone]);
        assert!(fired(&e.evaluate(&facts(5000, &p))).is_empty(), "cooldown");
        assert_eq!(fired(&e.evaluate(&facts(64_000, &p))), vec![RuleKind::Phone]);
        e.begin_check();
        assert!(fired(&e.evaluate(&facts(200_000, &p))).is_empty(), "a new check starts a new streak");
    }

    #[test]
    fn absent_waits_for_grace() {
        let mut e = engine(|_| ());
        assert!(fired(&e.evaluate(&facts(0, &[det(PERSON, 0.9, 0.0)]))).is_empty());
        assert!(fired(&e.evaluate(&facts(5_000, &[]))).is_empty());
        assert_eq!(fired(&e.evaluate(&facts(10_000, &[]))), vec![RuleKind::Absent]);
        e.restart_presence(20_000);
        assert!(fired(&e.evaluate(&facts(25_000, &[]))).is_empty());
    }

    #[test]
    fn uniform_frame_is_covered() {
        let mut e = engine(|_| ());
        let mut f = facts(0, &[]);
        f.luma_stddev = 2.0;
        let v = e.evaluate(&f);
        assert!(fired(&v).contains(&RuleKind::Covered));
        assert!(v.findings.iter().find(|f| f.rule == RuleKind::Covered).unwrap().score > 0.7);
    }

    #[test]
    fn disabled_rules_never_fire() {
        let mut e = engine(|r| r.phone.enabled = false);
        assert!(
            fired(&e.evaluate(&facts(0, &[det(PERSON, 0.9, 0.0), det(CELL_PHONE, 0.9, 300.0)]))).is_empty()
        );
    }
}
