//! SRV target ordering (RFC 2782), sans-IO: records and a random source in, the order to
//! try them out. The random source is injected so the weighted choice is unit-tested.

use crate::sip::Transport;

/// One SRV record, as the lookup found it (`_sipmail._udp.D` or `_sipmail._tcp.D`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvRecord {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// The target host, lower case, without the trailing dot ("." for "no service").
    pub target: String,
    /// The transport of the SRV name the record came from.
    pub transport: Transport,
}

/// What a set of SRV records says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SrvPlan {
    /// No records: RFC 3263 falls back to the domain's A/AAAA records.
    NoRecords,
    /// A single record with target ".": the domain says it offers no such service.
    Refused,
    /// The targets, in the order to try them.
    Ordered(Vec<SrvRecord>),
}

/// Order `records` as RFC 2782 says: lowest priority first; within one priority, a
/// weighted random order (records of weight 0 first in the running sum, so they are
/// picked rarely but not never). `random(n)` must return a uniform number in `0..=n`.
/// Records with target "." among others are dropped (only a lone "." means "refused").
pub fn order(records: &[SrvRecord], random: &mut dyn FnMut(u32) -> u32) -> SrvPlan {
    if records.is_empty() {
        return SrvPlan::NoRecords;
    }
    let real: Vec<&SrvRecord> = records.iter().filter(|r| r.target != ".").collect();
    if real.is_empty() {
        return SrvPlan::Refused;
    }
    let mut priorities: Vec<u16> = real.iter().map(|r| r.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    let mut out = Vec::with_capacity(real.len());
    for p in priorities {
        // Zero weights first, as RFC 2782 asks, then the others in the order found.
        let mut left: Vec<&SrvRecord> = real.iter().copied().filter(|r| r.priority == p).collect();
        left.sort_by_key(|r| r.weight != 0);
        while !left.is_empty() {
            let total: u32 = left.iter().map(|r| u32::from(r.weight)).sum();
            let pick = random(total).min(total);
            let mut running = 0u32;
            let mut chosen = left.len() - 1;
            for (i, r) in left.iter().enumerate() {
                running += u32::from(r.weight);
                if running >= pick {
                    chosen = i;
                    break;
                }
            }
            out.push(left.remove(chosen).clone());
        }
    }
    SrvPlan::Ordered(out)
}

/// A uniform random number in `0..=n` from the operating system's generator.
pub fn os_random(n: u32) -> u32 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0;
    }
    (u64::from_le_bytes(b) % (u64::from(n) + 1)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(priority: u16, weight: u16, target: &str) -> SrvRecord {
        SrvRecord {
            priority,
            weight,
            port: 5060,
            target: target.into(),
            transport: Transport::Udp,
        }
    }

    fn targets(p: SrvPlan) -> Vec<String> {
        match p {
            SrvPlan::Ordered(v) => v.into_iter().map(|r| r.target).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nothing_and_a_lone_dot() {
        assert_eq!(order(&[], &mut |_| 0), SrvPlan::NoRecords);
        assert_eq!(order(&[rec(0, 0, ".")], &mut |_| 0), SrvPlan::Refused);
        // A dot among real targets is ignored.
        assert_eq!(
            targets(order(&[rec(0, 0, "."), rec(5, 1, "b")], &mut |_| 0)),
            ["b"]
        );
    }

    #[test]
    fn lower_priority_first_whatever_the_weights() {
        let recs = [rec(20, 100, "c"), rec(10, 0, "a"), rec(15, 65535, "b")];
        for r in [0u32, 1, 7, u32::MAX] {
            assert_eq!(targets(order(&recs, &mut |_| r)), ["a", "b", "c"]);
        }
    }

    #[test]
    fn weights_pick_by_running_sum() {
        // One priority: weights 10 (x) and 30 (y), sum 40. A pick up to 10 takes x first,
        // above it y first; the one left is then picked whatever the number.
        let recs = [rec(1, 10, "x"), rec(1, 30, "y")];
        assert_eq!(targets(order(&recs, &mut |_| 10)), ["x", "y"]);
        assert_eq!(targets(order(&recs, &mut |_| 11)), ["y", "x"]);
        assert_eq!(targets(order(&recs, &mut |_| 40)), ["y", "x"]);
        // A zero weight goes first in the running sum: only a pick of 0 takes it.
        let recs = [rec(1, 5, "w"), rec(1, 0, "z")];
        assert_eq!(targets(order(&recs, &mut |_| 0)), ["z", "w"]);
        assert_eq!(targets(order(&recs, &mut |_| 1)), ["w", "z"]);
        // All zero: in the order found.
        let recs = [rec(1, 0, "p"), rec(1, 0, "q")];
        assert_eq!(targets(order(&recs, &mut |_| 0)), ["p", "q"]);
    }

    #[test]
    fn a_random_number_out_of_range_is_clamped() {
        let recs = [rec(1, 1, "x"), rec(1, 1, "y")];
        assert_eq!(targets(order(&recs, &mut |_| 1000)), ["y", "x"]);
    }

    #[test]
    fn weights_spread_the_first_choice_in_proportion() {
        // Weights 1 and 3, with every pick in 0..=4 once per round: x first for picks 0..=1
        // (2 of 5), y first for picks 2..=4 (3 of 5).
        let recs = [rec(1, 1, "x"), rec(1, 3, "y")];
        let mut n = 0u32;
        let mut first_y = 0;
        for _ in 0..500 {
            let t = targets(order(&recs, &mut |max| {
                let v = n % (max + 1);
                n += 1;
                v
            }));
            if t[0] == "y" {
                first_y += 1;
            }
        }
        assert!((250..=350).contains(&first_y), "{first_y}");
        assert!(os_random(0) == 0 && os_random(3) <= 3);
    }
}
