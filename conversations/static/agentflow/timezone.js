// The ops console shows times in the staff member's own time zone: the browser's IANA zone goes into
// the agentflow_tz cookie, which conversations.timezones.StaffTimezoneMiddleware activates on the next
// request. When the page was drawn in another zone, it is drawn once more in the right one.
(function () {
  "use strict";
  let zone = "";
  try {
    zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "";
  } catch (error) {
    return;
  }
  if (!/^[A-Za-z0-9_+\-\/]{1,64}$/.test(zone)) {
    return;
  }
  const current = document.currentScript ? document.currentScript.dataset.current : "";
  const cookie = document.cookie.split("; ").find((part) => part.startsWith("agentflow_tz="));
  if (cookie === "agentflow_tz=" + zone) {
    return;
  }
  document.cookie = "agentflow_tz=" + zone + "; path=/; max-age=31536000; SameSite=Lax";
  if (current && current !== zone && document.readyState !== "complete" && !sessionStorage.getItem("agentflow_tz_reloaded")) {
    sessionStorage.setItem("agentflow_tz_reloaded", "1");
    window.location.reload();
  }
})();
