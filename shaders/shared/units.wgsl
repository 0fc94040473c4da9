// units.wgsl: which unit (the rows of a clip with one coefficient each: a tensor, or an
// AGC row or column) an element belongs to, from its tensor's unit layout. A tensor's
// units are numbered from `first`; element `index` lies in unit
// `first + (index / div) % count`: whole tensors have count 1, rows div = row length,
// columns div 1 and count = number of columns. Host twin: `UnitLayout::unit_of`. Also part of the deferred-scaling include.

fn gradclip_unit(first: u32, div: u32, count: u32, index: u32) -> u32 {
    return first + (index / div) % count;
}
