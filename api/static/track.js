/*
 * Bisik's first-party tracking script. Include it once per page:
 *
 *   <script src="https://bisik.example.com/track.js" data-write-key="KEY" async></script>
 *
 * It sends a `page` call on load and defines window.bisik with track(event, properties),
 * identify(userId, traits), page(name, properties), reset(), anonymousId() and userId().
 * Calls are Segment HTTP API calls sent to this script's own origin (/v1/page, /v1/track,
 * /v1/identify), or to data-api-host when that attribute is set. The write key travels as
 * `writeKey` in a text/plain JSON body, which browsers send without a CORS preflight.
 *
 * Calls made before the script has loaded can be queued as arrays:
 *   window.bisik = window.bisik || []; bisik.push(["track", "Product Added", {...}]);
 *
 * Cookies (first-party, path=/, SameSite=Lax, Secure on https, one year, renewed on each load):
 *   bisik_aid  the anonymous id, a random UUID
 *   bisik_uid  the user id given to identify(), until reset()
 * data-cookie-domain=".example.com" shares them across subdomains; by default they belong to
 * the page's host only.
 */
(function () {
  "use strict";

  var VERSION = "1.0.0";
  var ANONYMOUS_COOKIE = "bisik_aid";
  var USER_COOKIE = "bisik_uid";
  var COOKIE_DAYS = 365;

  var script = document.currentScript;
  if (!script) {
    return;
  }
  var writeKey = script.getAttribute("data-write-key");
  if (!writeKey) {
    if (window.console) {
      console.error("bisik: track.js needs a data-write-key attribute on its <script> tag");
    }
    return;
  }
  var apiHost = (script.getAttribute("data-api-host") || new URL(script.src).origin).replace(/\/+$/, "");
  var cookieDomain = script.getAttribute("data-cookie-domain");
  var pending = Array.isArray(window.bisik) ? window.bisik : [];
  var unloading = false;

  function uuid4() {
    if (window.crypto && crypto.randomUUID) {
      return crypto.randomUUID();
    }
    // crypto.randomUUID exists only in secure contexts; getRandomValues works on plain http too.
    var bytes = crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    var hex = Array.prototype.map.call(bytes, function (byte) {
      return (byte + 0x100).toString(16).slice(1);
    }).join("");
    return hex.slice(0, 8) + "-" + hex.slice(8, 12) + "-" + hex.slice(12, 16) + "-" + hex.slice(16, 20) + "-" + hex.slice(20);
  }

  function readCookie(name) {
    var entries = document.cookie ? document.cookie.split("; ") : [];
    for (var index = 0; index < entries.length; index++) {
      var separator = entries[index].indexOf("=");
      if (entries[index].slice(0, separator) === name) {
        return decodeURIComponent(entries[index].slice(separator + 1));
      }
    }
    return null;
  }

  function writeCookie(name, value, days) {
    var cookie = name + "=" + encodeURIComponent(value) + "; Max-Age=" + days * 86400 + "; Path=/; SameSite=Lax";
    if (cookieDomain) {
      cookie += "; Domain=" + cookieDomain;
    }
    if (location.protocol === "https:") {
      cookie += "; Secure";
    }
    document.cookie = cookie;
  }

  var anonymousId = readCookie(ANONYMOUS_COOKIE) || uuid4();
  var userId = readCookie(USER_COOKIE);
  writeCookie(ANONYMOUS_COOKIE, anonymousId, COOKIE_DAYS);
  if (userId) {
    writeCookie(USER_COOKIE, userId, COOKIE_DAYS);
  }

  function pageContext() {
    var canonical = document.querySelector("link[rel='canonical']");
    return {
      path: location.pathname,
      referrer: document.referrer,
      search: location.search,
      title: document.title,
      url: canonical && canonical.href ? canonical.href : location.href
    };
  }

  function send(type, fields) {
    var now = new Date().toISOString();
    var call = {
      type: type,
      messageId: uuid4(),
      timestamp: now,
      anonymousId: anonymousId,
      context: {
        library: { name: "bisik-track.js", version: VERSION },
        locale: navigator.language,
        page: pageContext(),
        userAgent: navigator.userAgent
      }
    };
    if (userId) {
      call.userId = userId;
    }
    for (var key in fields) {
      if (Object.prototype.hasOwnProperty.call(fields, key)) {
        call[key] = fields[key];
      }
    }
    call.sentAt = now;
    call.writeKey = writeKey;

    var url = apiHost + "/v1/" + type;
    var body = JSON.stringify(call);
    // During unload a beacon is the call most likely to leave the page. Otherwise fetch with
    // keepalive, which survives a navigation that the tracked click starts and shows rejections.
    if ((unloading || !window.fetch) && navigator.sendBeacon && navigator.sendBeacon(url, new Blob([body], { type: "text/plain" }))) {
      return Promise.resolve();
    }
    return fetch(url, {
      method: "POST",
      headers: { "Content-Type": "text/plain" },
      body: body,
      keepalive: true,
      credentials: "omit"
    }).then(function (response) {
      if (!response.ok && window.console) {
        console.warn("bisik: the " + type + " call was rejected with HTTP " + response.status);
      }
      return response;
    }, function (error) {
      if (window.console) {
        console.warn("bisik: the " + type + " call failed: " + error);
      }
    });
  }

  var api = {
    page: function (name, properties) {
      var context = pageContext();
      var merged = {
        path: context.path,
        referrer: context.referrer,
        search: context.search,
        title: context.title,
        url: context.url
      };
      for (var key in properties || {}) {
        merged[key] = properties[key];
      }
      var fields = { properties: merged };
      if (name) {
        fields.name = name;
      }
      return send("page", fields);
    },
    track: function (event, properties) {
      return send("track", { event: event, properties: properties || {} });
    },
    identify: function (id, traits) {
      if (id !== null && typeof id === "object") {
        // identify(traits) for a visitor whose user id is not known yet, as in analytics.js.
        traits = id;
        id = null;
      }
      if (id) {
        userId = String(id);
        writeCookie(USER_COOKIE, userId, COOKIE_DAYS);
      }
      return send("identify", { traits: traits || {} });
    },
    reset: function () {
      // A new visitor on this browser, such as after a logout: forget the user and start anew.
      userId = null;
      writeCookie(USER_COOKIE, "", 0);
      anonymousId = uuid4();
      writeCookie(ANONYMOUS_COOKIE, anonymousId, COOKIE_DAYS);
    },
    anonymousId: function () {
      return anonymousId;
    },
    userId: function () {
      return userId;
    },
    push: function (call) {
      return api[call[0]].apply(api, call.slice(1));
    },
    version: VERSION
  };
  window.bisik = api;

  // Calls made after this listener has run (pagehide listeners added later, unload) go out as
  // beacons. Calls from listeners that ran before it use fetch with keepalive, which also
  // outlives the page in Chromium, Safari and Firefox 133 or later.
  window.addEventListener("pagehide", function () {
    unloading = true;
  });
  document.addEventListener("visibilitychange", function () {
    unloading = document.visibilityState === "hidden";
  });
  window.addEventListener("pageshow", function (event) {
    unloading = false;
    if (event.persisted) {
      // Restored from the back/forward cache: a new view of the page that no load event reports.
      api.page();
    }
  });

  api.page();
  for (var index = 0; index < pending.length; index++) {
    api.push(pending[index]);
  }
})();
