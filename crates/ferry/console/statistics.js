// ferry console: the Statistics view (registered in VIEW_FNS; uses app.js's
// S, el, api, badge, act, confirmThen). Not built yet: app.js shows the
// placeholder until this file sets VIEW_FNS.statistics.
"use strict";
